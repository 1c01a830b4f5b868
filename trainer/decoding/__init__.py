"""Decoding beyond one utterance at a time: timestamped long-form segments (longform), the
decoding modes RealtimeSTT uses (realtime_modes), and CTranslate2 exports (ct2_backend)."""

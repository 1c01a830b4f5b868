"""Two torchrun "nodes" on localhost (c10d rendezvous, gloo), training from an S3 bucket.

Each node has its own shard cache (a machine's local disk) and both share the run folder (a
cluster's shared file system). The run is SIGKILLed after its first checkpoint and started
again with the same commands, as a cluster's job restart would: it resumes and finishes, every
rank having taken the same steps on disjoint utterances.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests._trainer_run import FAST, REPO, _free_port, sample_log
from tests.s3_server import BUCKET, client_environment
from trainer.runtime import checkpoint as ckpt

pytestmark = pytest.mark.slow

STEPS = 4
ARGS = ("--max-steps", str(STEPS), "--save-every", "2", "--eval-every", "0", "--pack", "true")


def node_command(node_rank: int, rendezvous_port: int, run_dir) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{rendezvous_port}",
        "--rdzv_id",
        "multinode-test",
        "-m",
        "trainer",
        *FAST,
        "--shards",
        f"s3://{BUCKET}/demo",
        "--output-dir",
        str(run_dir),
        *ARGS,
    ]


def run_two_nodes(endpoint: str, run_dir, caches, extra_env=None, timeout: float = 300):
    """Start both nodes, wait for both; (returncode, output) per node."""
    port = _free_port()
    processes = []
    for node, cache in enumerate(caches):
        env = {**client_environment(endpoint, cache), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        env.pop("SHARDS_DIR", None)
        processes.append(
            subprocess.Popen(
                node_command(node, port, run_dir),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return results


def test_two_nodes_train_from_a_bucket_checkpoint_and_resume(bucket, tmp_path):
    endpoint = bucket[0]
    run_dir = tmp_path / "run"
    caches = [tmp_path / "node0-cache", tmp_path / "node1-cache"]
    killed = run_two_nodes(endpoint, run_dir, caches, {"TRAINER_DEBUG_KILL_AT_STEP": "3"})
    assert any(code != 0 for code, _ in killed), "the kill hook did not fire"
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2]
    # each node fetched the splits into its own cache, verified against the manifest
    for cache in caches:
        assert len(list(cache.glob("*/manifest.json"))) == 2

    resumed = run_two_nodes(endpoint, run_dir, caches)
    for code, output in resumed:
        assert code == 0, output[-4000:]
    assert any("resuming from" in output for _, output in resumed)
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)][-1] == STEPS
    logs = [sample_log(run_dir, rank) for rank in (0, 1)]
    for step in range(1, STEPS + 1):
        keys0, keys1 = logs[0][step]["keys"], logs[1][step]["keys"]
        assert keys0 and keys1 and not set(keys0) & set(keys1), step
    assert sorted(logs[0]) == sorted(logs[1]) == list(range(1, STEPS + 1))

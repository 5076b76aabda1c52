"""The full-backbone fine-tuning under torchrun: two CPU processes (gloo) follow the one-process run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from anomatune.finetune.ddp import ProcessGroup

from ..apps.test_cli import FAST_OPTIONS, cli
from ..conftest import save_image

ANOMATUNE = Path(sys.executable).parent / "anomatune"


def test_shares_cover_the_batch_in_order():
    for n in (1, 4, 7):
        shares = [ProcessGroup(rank, 3).share(n) for rank in range(3)]
        assert [i for s in shares for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


def torchrun(*args) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ANOMATUNE),
        *map(str, args),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    )


@pytest.mark.skipif(not ANOMATUNE.is_file(), reason="the anomatune command is not installed beside this Python")
def test_two_processes_match_one_and_resume_exactly(mvtec_tree, tmp_path):
    photos = tmp_path / "photos"
    for i in range(3):
        save_image(photos / f"{i}.png", size=(50, 40), rng=np.random.default_rng(i))
    common = [
        "finetune",
        "--data",
        mvtec_tree,
        "--category",
        "widget",
        "--negatives",
        photos,
        *FAST_OPTIONS,
        "--proj-dim",
        "8",
        "--set",
        "n_components=2",
        "--diag-images",
        "2",
        "--mode",
        "backbone",
        "--batch-pos",
        "3",
        "--batch-neg",
        "3",
        "--negative-mode",
        "pasted+noise",
        "--filter",
        "fraction",
        "--trust",
        "0.1",
        "--checkpoint-every",
        "2",
        "--validation-share",
        "0",
    ]
    code, _, err = cli(*common, "--steps", "4", "--out", tmp_path / "one")
    assert code == 0, err
    done = torchrun(*common, "--steps", "4", "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.count("fine-tuned backbone in") == 1 and "fine-tuning on 2 processes (gloo)" in done.stderr
    )  # rank 0 speaks
    one, two = (json.loads((tmp_path / d / "diagnostics.json").read_text())["history"] for d in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "loss_pos", "loss_neg", "drift", "p_pos_misclassified", "p_neg_inside"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    weights_one, weights_two = (load_file(tmp_path / d / "backbone.safetensors") for d in ("one", "two"))
    assert max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one) < 1e-4
    # stopped after step 2 (its checkpoint), then resumed to step 4 on two processes: the uninterrupted run's steps
    shutil.rmtree(tmp_path / "two")
    assert torchrun(*common, "--steps", "2", "--out", tmp_path / "two").returncode == 0
    done = torchrun(*common, "--steps", "4", "--resume", "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((tmp_path / "two" / "diagnostics.json").read_text())["history"]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in two], rel=1e-6)

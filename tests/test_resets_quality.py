"""experiments/resets_quality.py end to end on the CPU at toy size, on a corpus of short documents (so that
rows hold document starts): four runs of the library's loop, every model measured under both rules, the
report's table. About 45 s on 2 CPU cores, JAX's start-up and compilation included.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_documents(root, seed: int = 0) -> str:
    """A text corpus split by folders: 40 training and 20 validation documents of 100–600 characters."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "(", ")", ":"]
    for split, count in (("train", 40), ("validation", 20)):
        os.makedirs(os.path.join(root, split))
        for i in range(count):
            text = " ".join(rng.choice(words, size=rng.integers(20, 100)))
            with open(os.path.join(root, split, f"doc{i:03d}.txt"), "w") as f:
                f.write(text)
    return root


@pytest.mark.slow
def test_smoke_run(tmp_path):
    corpus = short_documents(str(tmp_path / "corpus"))
    out = tmp_path / "results"
    env = dict(os.environ)
    # One CPU device (the test set-up's 8 fake devices would split the 2-row toy batches).
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    cmd = [
        sys.executable,
        "-m",
        "experiments.resets_quality",
        "--smoke",
        f"--dataset=text:{corpus}",
        f"--data_dir={tmp_path / 'tfds'}",
        f"--out_dir={out}",
        "--seq_len=256",
        "--eval_batches=0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    files = sorted(os.listdir(out))
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"], files
    assert all(f.startswith("resets_quality_cpu_") for f in files), files
    stem = os.path.join(out, files[0].rsplit(".", 1)[0])
    with open(stem + ".json") as f, open(stem + ".md") as g:
        results, text = json.load(f), g.read()

    rows = results["rows"]
    assert [(r["arch"], r["resets"]) for r in rows] == [
        ("retnet", True),
        ("retnet", False),
        ("transformer", True),
        ("transformer", False),
    ]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    # Same tokens and steps for every run; the loop's last validation point is our own evaluation.
    assert len({(r["tokens"], r["steps"]) for r in rows}) == 1 and rows[0]["steps"] == 6
    assert all(abs(r["curve_check"]) < 1e-4 for r in rows)
    validation = results["data"]["validation_rows"]
    share = validation["tokens_after_boundary"]
    assert validation["rows_with_boundary"] > 0.5 and 0 < share < 1
    assert results["data"]["train_rows"]["rows_with_boundary"] > 0.5
    for row in rows:
        # The rules differ only after a row's first document start: the loss over all targets moves by
        # that share of the difference after a boundary.
        after = row["after_boundary_with_resets"] - row["after_boundary_without_resets"]
        overall = row["eval_with_resets"] - row["eval_without_resets"]
        assert abs(after) > 1e-3
        np.testing.assert_allclose(overall, share * after, atol=1e-4)
    # Training with and without resets saw the same batches but learned different models.
    for arch in ("retnet", "transformer"):
        pair = [r for r in rows if r["arch"] == arch]
        assert pair[0]["eval_with_resets"] != pair[1]["eval_with_resets"]

    assert (
        "| arch | params | seed | resets in training | val loss, eval with resets | val loss, eval without |"
        in text
    )
    table = [line for line in text.splitlines() if line.startswith(("| retnet |", "| transformer |"))]
    assert len(table) == 4 and all(line.count("|") == 13 for line in table)
    assert "trained with resets − trained without" in text

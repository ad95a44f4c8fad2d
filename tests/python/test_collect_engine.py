"""collect through the engine interface (issue #17): options the engine cannot honour are one line."""
import os
import subprocess

from conftest import REPO

SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DATA = os.path.join(REPO, "assets", "demo", "data")


def test_decoder_without_generation_steps_is_one_line(cli, tmp_path):
    """--decoder --max-new-tokens 0 used to end in 'map::at' after loading the model."""
    for n in ("0", "-3"):
        proc = subprocess.run([cli, "collect", "--model", "demo", "--datasets", "demo", "--data-root", DATA,
                               "--tokenizer", SPM, "--device", "cpu", "--no-progress", "-t", "12", "--decoder",
                               "--max-new-tokens", n, "-o", str(tmp_path / f"s{n}")],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("moetrace: error: "), proc.stderr
        assert f"--max-new-tokens {n}: expected at least 1 with --decoder" in lines[0], lines[0]
        assert not (tmp_path / f"s{n}").exists()

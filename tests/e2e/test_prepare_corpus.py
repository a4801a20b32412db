"""launch/prepare_corpus.py: bad input is one error line and exit code 2; --encoding-errors replace goes on."""

from __future__ import annotations

import json

from tests.e2e.conftest import run_script


def test_non_utf8_input_is_a_clear_error_and_replace_goes_on(tiny_bert_dir, tmp_path):
    (tmp_path / "good.txt").write_text("the game was played. the team won.\n\nthe market fell.")
    (tmp_path / "bad.txt").write_bytes(b"the bank \xa3 sold oil.\n")
    args = ["launch/prepare_corpus.py", "--input", str(tmp_path / "good.txt"), str(tmp_path / "bad.txt"),
            "--tokenizer", str(tiny_bert_dir), "--output", str(tmp_path / "shards"), "--seq-len", "16",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    proc = run_script(*args, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "bad.txt is not UTF-8" in errors[0] and "--encoding-errors replace" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "shards" / "manifest.json").exists()

    run_script(*args, "--encoding-errors", "replace")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_sequences"] > 0

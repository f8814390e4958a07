from calmlm.io.metrics import last_eval, read_metrics


def test_metrics_reader_skips_a_line_cut_by_a_crash(tmp_path):
    """read_metrics / last_eval are the one reader of metrics.jsonl (trainer resume, compare, quickstart, model
    cards): a last line cut mid-write is skipped, not an error."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "eval", "step": 2, "val_loss": 3.0}\n{"type": "train", "step": 3, "loss": 2.5}\n'
                    '{"type": "eval", "step": 4, "brierlm": 1.5}\n{"type": "eval", "st')
    assert [r["step"] for r in read_metrics(path)] == [2, 3, 4]
    assert last_eval(path)["step"] == 4 and last_eval(path, "val_loss")["step"] == 2
    assert last_eval(tmp_path / "checkpoint", "brierlm")["brierlm"] == 1.5  # a checkpoint folder: the run's file
    assert read_metrics(tmp_path / "missing.jsonl") == [] and last_eval(tmp_path / "other" / "run") is None

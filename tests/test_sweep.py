"""Hyperparameter search: grids, random draws, and run_sweep with a fake fine-tune (fast, no model)."""
import csv
import json

import pytest
import torch

import minift.cli
import minift.recipe
import minift.sweep
from minift.cli import main
from minift.errors import MiniftError
from minift.sweep import grid, random_trials, run_sweep, seconds_to
from minift.config import TrainConfig

SPACE = {"lr": [1e-5, 5e-5, 1e-4], "batch_size": [16, 32]}

# Scripted validation numbers per (lr, batch_size): accuracy, macro-F1, loss.
SCRIPT = {(1e-5, 16): (0.60, 0.50, 0.90), (1e-5, 32): (0.55, 0.45, 0.95),
          (5e-5, 16): (0.80, 0.70, 0.60), (5e-5, 32): (0.75, 0.72, 0.50),  # lowest loss is not best accuracy
          (1e-4, 16): (0.70, 0.60, 0.70), (1e-4, 32): (0.65, 0.55, 0.80)}


@pytest.fixture
def fake_finetune(monkeypatch):
    """Replace finetune_classifier by a fake that returns SCRIPT's numbers; lr 1.0 fails like a NaN would,
    batch_size 4096 like a full GPU."""
    calls = []

    def fake(model, data, out, cfg, max_length, limit=None, test=True, **options):
        calls.append({"out": out, "cfg": cfg, "limit": limit, "test": test, **options})
        print("a chatty fine-tune report")  # goes to the trial's output.txt, not the sweep's screen
        (out / "checkpoint").mkdir()  # the sweep deletes the resumable state once the trial is done
        (out / "best").mkdir()
        if cfg.lr == 1.0:
            raise MiniftError("non-finite loss (nan) at step 3, lr 1: lower the lr")
        if cfg.batch_size == 4096:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        acc, f1, loss = SCRIPT[(cfg.lr, cfg.batch_size)]
        # two evaluations in the log, as train() writes them: wall seconds since its start, and their own time
        (out / "log.jsonl").write_text(
            json.dumps({"step": 5, "loss": 1.0}) + "\n"
            + json.dumps({"step": 5, "eval": {"accuracy": acc / 2, "macro_f1": f1, "loss": loss}, "seconds": 3.0,
                          "eval_seconds": 1.0}) + "\n"
            + json.dumps({"step": 10, "eval": {"accuracy": acc, "macro_f1": f1, "loss": loss}, "seconds": 7.5,
                          "eval_seconds": 1.5}) + "\n")
        return {"validation": {"accuracy": acc, "macro_f1": f1, "loss": loss}, "best_step": 7, "steps": 10,
                "stopped_early": False}

    monkeypatch.setattr(minift.sweep, "finetune_classifier", fake)
    return calls


def test_grid_has_every_combination_in_a_stable_order():
    trials = grid(SPACE)
    assert len(trials) == 6
    assert trials[:3] == [{"lr": 1e-5, "batch_size": 16}, {"lr": 1e-5, "batch_size": 32},
                          {"lr": 5e-5, "batch_size": 16}]  # the first setting changes slowest
    assert len({tuple(t.items()) for t in trials}) == 6
    for key, values in SPACE.items():
        assert {t[key] for t in trials} == set(values)
    assert grid(SPACE) == trials


@pytest.mark.parametrize("space, words", [({}, "nothing to sweep"), ({"learning_rate": [1e-5]}, "not a TrainConfig"),
                                          ({"lr": []}, "non-empty list"), ({"lr": 1e-5}, "non-empty list"),
                                          ({"lr": [1e-5, 1e-5]}, "twice"), ({"metric": ["loss", "accuracy"]}, "base")])
def test_bad_spaces_are_explained(space, words):
    with pytest.raises(MiniftError, match=words):
        grid(space)


def test_random_trials_are_distinct_deterministic_and_from_the_grid():
    space = {"lr": [1e-5, 2e-5, 5e-5, 1e-4], "batch_size": [8, 16, 32, 64], "dropout": [0.0, 0.1, 0.2]}
    draw = random_trials(space, 5, seed=0)
    assert len(draw) == 5 and len({tuple(t.items()) for t in draw}) == 5
    assert all(t in grid(space) for t in draw)
    assert random_trials(space, 5, seed=0) == draw
    assert random_trials(space, 5, seed=1) != draw
    every = random_trials(space, 48, seed=3)  # all of them: every combination, so every value, once
    assert sorted(map(str, every)) == sorted(map(str, grid(space)))
    with pytest.raises(MiniftError, match="cannot draw 49"):
        random_trials(space, 49)


def test_sweep_records_every_trial_and_picks_the_best_on_validation(tmp_path, fake_finetune, capsys):
    result = run_sweep(SPACE, out=tmp_path, limit=200, base=TrainConfig(epochs=1))
    assert len(fake_finetune) == 6
    assert all(c["test"] is False and c["limit"] == 200 and c["cfg"].epochs == 1 for c in fake_finetune)
    assert result["best"]["settings"] == {"lr": 5e-5, "batch_size": 16}  # highest accuracy
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["settings"] for r in lines] == grid(SPACE) == [r["settings"] for r in result["trials"]]
    assert all(r["status"] == "ok" and r["best_step"] == 7 and r["seconds"] >= 0 for r in lines)
    assert lines[2]["val_accuracy"] == 0.80 and lines[2]["val_macro_f1"] == 0.70 and lines[2]["val_loss"] == 0.60
    # the learning curve: training seconds before each evaluation, the evaluations' own time taken out
    assert [(p["step"], p["train_seconds"], p["accuracy"]) for p in lines[2]["curve"]] == [(5, 2.0, 0.40), (10, 5.0, 0.80)]
    assert seconds_to(lines[2]["curve"], 0.75) == 5.0 and seconds_to(lines[2]["curve"], 0.4) == 2.0
    assert seconds_to(lines[2]["curve"], 0.81) is None
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [float(r["val_accuracy"]) for r in rows] == sorted((s[0] for s in SCRIPT.values()), reverse=True)
    assert rows[0]["lr"] == "5e-05" and rows[0]["batch_size"] == "16" and rows[0]["rank"] == "1"
    out = capsys.readouterr().out
    table = out[out.index("rank"):].splitlines()
    assert [line.split()[1] for line in table[1:7]] == ["2", "3", "4", "5", "0", "1"]  # trial numbers, best first
    assert "a chatty fine-tune report" not in out
    assert "chatty" in (tmp_path / "trial-000" / "output.txt").read_text()
    assert not (tmp_path / "trial-000" / "checkpoint").exists() and (tmp_path / "trial-000" / "best").exists()


def test_listed_trials_run_as_given_with_the_base_for_the_rest(tmp_path, fake_finetune, capsys):
    """Levers tried in a few combinations, not a grid: each trial is a dict; unset settings come from base."""
    trials = [{"lr": 5e-5}, {"lr": 1e-4, "batch_size": 32}, {"lr": 5e-5, "freeze": ["embeddings"]}]
    result = run_sweep(trials, out=tmp_path, base=TrainConfig(batch_size=16))
    assert [(c["cfg"].lr, c["cfg"].batch_size, c["cfg"].freeze) for c in fake_finetune] == [
        (5e-5, 16, []), (1e-4, 32, []), (5e-5, 16, ["embeddings"])]
    assert [r["settings"] for r in result["trials"]] == trials
    table = capsys.readouterr().out.split("rank", 1)[1].splitlines()[0]
    assert table.split() == ["trial", "lr", "batch_size", "freeze", "val", "acc", "val", "F1", "val", "loss", "best",
                             "step", "seconds"]
    for bad, message in [([], "non-empty list"), ([{"lr": 1e-4}, {"lr": 1e-4}], "listed twice"),
                         ([{"speed": 2}], "not a TrainConfig setting"), ([{"metric": "loss"}], "set it in base")]:
        with pytest.raises(MiniftError, match=message):
            run_sweep(bad, out=tmp_path / "bad")


def test_metric_loss_picks_the_lowest_validation_loss(tmp_path, fake_finetune):
    result = run_sweep(SPACE, out=tmp_path, base=TrainConfig(metric="loss"))
    assert result["best"]["settings"] == {"lr": 5e-5, "batch_size": 32}
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [float(r["val_loss"]) for r in rows] == sorted(s[2] for s in SCRIPT.values())


def test_ties_go_to_the_lower_validation_loss(tmp_path, monkeypatch, fake_finetune):
    monkeypatch.setitem(SCRIPT, (1e-4, 16), (0.80, 0.70, 0.55))  # ties trial 2 on accuracy, lower loss
    assert run_sweep(SPACE, out=tmp_path)["best"]["trial"] == 4


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, fake_finetune, capsys):
    result = run_sweep({"lr": [1.0, 5e-5], "batch_size": [16]}, out=tmp_path)
    assert len(fake_finetune) == 2
    failed, ok = (json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines())
    assert failed["status"] == "failed" and "non-finite loss" in failed["error"] and "val_accuracy" not in failed
    assert ok["status"] == "ok" and result["best"]["trial"] == 1
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["status"] for r in rows] == ["ok", "failed"]  # failures sort last
    assert "trial 0 failed: non-finite loss" in capsys.readouterr().out


def test_out_of_gpu_memory_is_a_failed_trial(tmp_path, fake_finetune):
    result = run_sweep({"lr": [5e-5], "batch_size": [4096, 16]}, out=tmp_path)
    assert result["trials"][0]["status"] == "failed" and "smaller batch_size" in result["trials"][0]["error"]
    assert result["best"]["trial"] == 1


def test_all_trials_failed_is_an_error_after_recording_them(tmp_path, fake_finetune):
    with pytest.raises(MiniftError, match="all 1 trials failed"):
        run_sweep({"lr": [1.0]}, out=tmp_path)
    assert json.loads((tmp_path / "results.jsonl").read_text())["status"] == "failed"


def test_a_rerun_goes_on_with_the_trials_not_done(tmp_path, fake_finetune):
    run_sweep({"lr": [1e-5, 5e-5], "batch_size": [16]}, out=tmp_path)
    assert len(fake_finetune) == 2
    result = run_sweep({"lr": [1e-5, 5e-5, 1e-4], "batch_size": [16]}, out=tmp_path)
    assert len(fake_finetune) == 3 and fake_finetune[-1]["cfg"].lr == 1e-4
    assert [r["trial"] for r in result["trials"]] == [0, 1, 2]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    with pytest.raises(MiniftError, match="different sweep"):
        run_sweep({"lr": [1e-5]}, out=tmp_path, limit=100)


def test_command_line_sweep(tmp_path, fake_finetune, capsys):
    main(["sweep", "--lr", "1e-5,5e-5", "--batch-size", "16", "--epochs", "1", "--limit", "200",
          "--out", str(tmp_path)])
    assert [c["cfg"].lr for c in fake_finetune] == [1e-5, 5e-5]
    assert all(c["cfg"].epochs == 1 and c["cfg"].batch_size == 16 and c["limit"] == 200 for c in fake_finetune)
    # the trials follow the main job's recipe (minift/recipe.py), as `minift finetune` does
    assert all(c["pooling"] == minift.recipe.POOLING and c["cfg"].precision == TrainConfig().precision
               for c in fake_finetune)
    assert "best on validation accuracy: trial 1 (lr=5e-05)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sweep", "--out", str(tmp_path / "none")])
    assert "nothing to sweep" in capsys.readouterr().err


def test_command_line_sweep_with_lora_follows_finetunes_lora_recipe(tmp_path, fake_finetune, monkeypatch, capsys):
    """One --lora-r: recipe.LORA_TRAIN on top of MAIN_TRAIN for every trial, as `minift finetune --lora-r 8`
    does; several ranks in one sweep are refused (each rank wants its own lr and freeze)."""
    main_lr, lora_lr = minift.recipe.MAIN_TRAIN["lr"], minift.recipe.LORA_TRAIN["lr"]
    for lr in (main_lr, lora_lr):  # the fake's numbers for the trials' (unswept) lr
        for batch_size in (16, 32):
            monkeypatch.setitem(SCRIPT, (lr, batch_size), (0.7, 0.6, 0.5))
    argv = ["sweep", "--batch-size", "16,32", "--limit", "200"]
    main(argv + ["--out", str(tmp_path / "full")])
    assert [c["cfg"].batch_size for c in fake_finetune] == [16, 32]
    assert all(c["cfg"].lora_r == 0 and c["cfg"].lr == main_lr and c["cfg"].freeze == minift.recipe.MAIN_TRAIN["freeze"]
               for c in fake_finetune)
    fake_finetune.clear()
    main(argv + ["--lora-r", "8", "--out", str(tmp_path / "lora")])
    assert [c["cfg"].batch_size for c in fake_finetune] == [16, 32]
    for c in fake_finetune:
        assert c["cfg"].lora_r == 8
        assert c["cfg"].lr == lora_lr and c["cfg"].freeze == minift.recipe.LORA_TRAIN["freeze"]
        assert c["cfg"].dropout == minift.recipe.MAIN_TRAIN["dropout"]  # the rest of MAIN_TRAIN still holds
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--lora-r", "1,2", "--out", str(tmp_path / "ranks")])
    assert exit_.value.code == 2
    assert "--lora-r takes one value per sweep" in capsys.readouterr().err
    assert len(fake_finetune) == 2 and not (tmp_path / "ranks").exists()  # refused before any trial


def test_a_real_sweep_never_opens_the_test_split(tmp_path, monkeypatch):
    """The recipe search reads validation only: no text of the test split is even tokenized (a real sweep, a
    tiny random-init BERT with MiniLM's tokenizer, a CSV whose test rows carry a marker word)."""
    import shutil

    from minift.checkpoints import build_model, save_checkpoint
    from minift.data import read_csv, split
    from minift.hub import fetch_minilm
    from minift.tokenizer import Tokenizer

    model_dir = tmp_path / "tiny"
    tiny = build_model(dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=16, max_position_embeddings=64), "classify")
    save_checkpoint(tiny, model_dir)
    shutil.copy(fetch_minilm() / "tokenizer.json", model_dir / "tokenizer.json")
    rows = [{"text": f"row {i} {'good' if i % 2 else 'bad'} day", "label": "pos" if i % 2 else "neg"} for i in range(80)]
    data = tmp_path / "rows.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    # mark the rows that the split will put in test (same seed, same fractions as the sweep's)
    test_texts = {r["text"] for r in split(read_csv(data, {"text": "text", "label": "label"}), seed=0)["test"]}
    assert test_texts
    seen = []
    real = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda self, texts, *a, **kw: seen.extend(texts) or real(
        self, texts, *a, **kw))
    result = run_sweep({"lr": [1e-3, 3e-3]}, model=str(model_dir), data=str(data), out=tmp_path / "sweep",
                       max_length=16, base=TrainConfig(epochs=1, batch_size=8, precision="fp32"))
    assert [t["status"] for t in result["trials"]] == ["ok", "ok"] and seen
    assert not test_texts & set(seen), "the sweep tokenized test rows"

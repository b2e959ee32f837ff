"""The job skeleton (issue 27): every setting means the same by every route, one place decides what trains,
best/ is a loadable checkpoint from the moment it is chosen, one number per model and split, a resume
refuses another run's checkpoint, and `minift generate` talks to a chat model in its template.

Runs on test_faults' tiny random-init BERT (MiniLM's tokenizer, 90 rows): a few seconds each."""
import json

import pytest
import torch
from safetensors.torch import load_file

from minift import cli
from minift.checkpoints import build_model
from minift.config import TrainConfig
from minift.evaluate import format_metrics
from minift.layers import Dropout
from minift.lora import lora_layers
from minift.recipe import LORA_TRAIN, MAIN_TRAIN
from minift.resume import read_log
from minift.train import prepare_model, resolved_precision
from test_faults import TINY, cli_error, quick, tiny  # noqa: F401  (tiny: a fixture)

# ---------------------------------------------------------------------------------------------------------
# One meaning per TrainConfig field: flags, a TOML file and the sweep give the same config, and the loop
# (prepare_model) does the same with it as with the one an API user writes.

ROUTES = {  # field family: (flags, the same in TOML, the same as TrainConfig arguments)
    "lora": (["--lora-r", "4", "--lora-targets", "query,value"], 'lora_r = 4\nlora_targets = ["query", "value"]\n',
             {"lora_r": 4, "lora_targets": ["query", "value"]}),
    "freeze": (["--freeze", "embeddings,layers:1"], 'freeze = ["embeddings", "layers:1"]\n',
               {"freeze": ["embeddings", "layers:1"]}),
    "dropout": (["--dropout", "0.2"], "dropout = 0.2\n", {"dropout": 0.2}),
    "precision": (["--precision", "fp32"], 'precision = "fp32"\n', {"precision": "fp32"}),
}


@pytest.mark.parametrize("family", list(ROUTES))
def test_a_setting_means_the_same_by_every_route(family, tmp_path, monkeypatch):
    import minift.classify
    import minift.sweep

    flags, toml, api = ROUTES[family]
    seen = []
    monkeypatch.setattr(minift.classify, "finetune_classifier", lambda *a, **kw: seen.append(kw["cfg"]))
    monkeypatch.setattr(minift.sweep, "run_sweep", lambda *a, **kw: seen.append(a[7]))  # its base config
    (tmp_path / "s.toml").write_text(toml)
    cli.main(["finetune", "--out", str(tmp_path / "a"), *flags])
    cli.main(["finetune", "--out", str(tmp_path / "b"), "--config", str(tmp_path / "s.toml")])
    cli.main(["sweep", "--out", str(tmp_path / "c"), *flags])
    # the recipe's defaults under them: MAIN_TRAIN, and LORA_TRAIN on top wherever lora_r > 0
    expected = TrainConfig(**{**MAIN_TRAIN, **(LORA_TRAIN if api.get("lora_r") else {}), **api})
    assert [vars(cfg) for cfg in seen] == [vars(expected)] * 3

    torch.manual_seed(0)
    model = build_model(TINY | {"num_hidden_layers": 2}, "classify", num_labels=3)
    prepare_model(model, TrainConfig(**api))  # what train() does with an API user's config
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if family == "lora":  # adapters on query and value, and the new head: nothing else trains
        assert sorted(lora_layers(model)) == [f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1)
                                              for k in ("query", "value")]
        assert trained == {f"{n}.lora_{ab}" for n in lora_layers(model) for ab in "AB"} | {
            "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    elif family == "freeze":
        frozen = {n for n, _ in model.named_parameters()} - trained
        assert frozen and all(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in frozen)
        assert all(n in frozen for n, _ in model.named_parameters() if n.startswith("bert.embeddings."))
    elif family == "dropout":
        rates = [m.p for m in model.modules() if isinstance(m, Dropout)]
        assert rates and set(rates) == {0.2}
    else:
        assert resolved_precision(expected.precision, torch.device("cpu")) == "fp32"


def test_lora_flag_with_rank_0_is_refused(capsys, tmp_path, tiny):  # noqa: F811
    line = cli_error(capsys, quick(tiny, tmp_path / "r0", "--lora", "--lora-r", "0"))
    assert "--lora-r 0" in line


# ---------------------------------------------------------------------------------------------------------
# What a run leaves: best/ loadable at any moment, and one number per model and split

def test_a_lora_run_stopped_before_its_report_leaves_a_best_that_predict_loads(capsys, tmp_path, tiny,  # noqa: F811
                                                                              monkeypatch):
    import minift.classify

    def stop(*args, **kwargs):  # killed right after training, before the report was written
        raise KeyboardInterrupt

    monkeypatch.setattr(minift.classify, "load_best", stop)
    out = tmp_path / "lora"
    with pytest.raises(SystemExit) as exit_:
        cli.main(quick(tiny, out, "--lora-r", "4"))
    assert exit_.value.code == 130 and not (out / "results.json").exists()
    keys = load_file(str(out / "best" / "model.safetensors"))
    assert keys and not any("lora_" in k for k in keys)  # merged when it was chosen: a plain checkpoint
    capsys.readouterr()
    cli.main(["predict", str(out / "best"), "great lovely day", "awful sad day"])
    merged = capsys.readouterr().out.splitlines()
    assert len(merged) == 2 and all(line.split()[0] in ("pos", "neg", "neu") for line in merged)
    # the base model with adapter/ (peft's layout, and the head's pooling and class names beside it) says the
    # same, to the printed digits
    cli.main(["predict", str(tiny / "model"), "great lovely day", "awful sad day", "--adapter", str(out / "adapter")])
    assert capsys.readouterr().out.splitlines() == merged


def test_one_number_per_model_and_split(capsys, tmp_path, tiny):  # noqa: F811
    out = tmp_path / "one"
    cli.main(quick(tiny, out, "--precision", "auto"))  # bf16 where the CPU has it: the case that printed two
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    evals = {r["step"]: r["eval"] for r in read_log(out / "log.jsonl")[1]}
    logged = evals[report["best_step"]]  # the log's numbers (the scalar ones) for the model best/ holds
    assert {"accuracy", "macro_f1", "loss"} <= set(logged)
    assert {k: report["validation"][k] for k in logged} == logged
    assert f"validation (best step {report['best_step']}):\n{format_metrics(report['validation'])}" in printed


# ---------------------------------------------------------------------------------------------------------
# A resume continues the same run or says why not, in one line, leaving the checkpoint as it was

def test_resume_refuses_another_run(capsys, tmp_path, tiny):  # noqa: F811
    out = tmp_path / "run"
    cli.main(quick(tiny, out, "--save-every", "1", "--max-steps", "2"))
    state = (out / "checkpoint" / "trainer_state.json").read_bytes()
    rows = (tiny / "data.csv").read_text().splitlines()
    (tmp_path / "changed.csv").write_text("\n".join(rows[:-1] + ["a new row entirely,pos"]) + "\n")
    (tmp_path / "renamed.csv").write_text("\n".join(rows).replace(",pos", ",good") + "\n")
    cases = [(["--lora-r", "4"], "another model or other LoRA settings"),
             (["--data", tmp_path / "changed.csv"], "training data differ"),
             (["--data", tmp_path / "renamed.csv"], "has the labels")]
    for extra, says in cases:
        argv = quick(tiny, out, "--max-steps", "3", "--resume", *extra)
        if "--data" in extra:  # the later --data wins
            argv = argv + ["--data", str(extra[1])]
        assert says in cli_error(capsys, argv), extra
        assert (out / "checkpoint" / "trainer_state.json").read_bytes() == state
    cli.main(quick(tiny, out, "--max-steps", "3", "--resume"))  # the same run resumes
    assert json.loads((out / "results.json").read_text())["steps"] == 3


# ---------------------------------------------------------------------------------------------------------
# `minift generate` speaks to an instruct model in its chat template unless told --raw

@pytest.mark.slow
def test_generate_answers_a_chat_model_in_its_template(capsys, smollm2_dir):
    smollm2 = smollm2_dir
    question = "What is the capital of France?"
    cli.main(["generate", str(smollm2), question, "--max-new-tokens", "12"])
    answer = capsys.readouterr().out
    assert "Paris" in answer, answer
    cli.main(["generate", str(smollm2), question, "--max-new-tokens", "12", "--chat"])
    assert capsys.readouterr().out == answer  # --chat is what the default already does for this model
    cli.main(["generate", str(smollm2), question, "--max-new-tokens", "12", "--raw"])
    assert capsys.readouterr().out != answer  # the bare text, continued
    assert "--chat and --raw" in cli_error(capsys, ["generate", str(smollm2), question, "--chat", "--raw"])


# ---------------------------------------------------------------------------------------------------------
# Settings checked where they enter (issue 26): one line, before any work

@pytest.mark.parametrize("extra, says", [
    (["--freeze", "*"], "nothing is left to train"),
    (["--limit", "0"], "limit 0 must be a whole number >= 1"),
    (["--limit", "-5"], "limit -5 must be a whole number >= 1"),
    (["--max-length", "0"], "max_length 0 must be a whole number of tokens"),
])
def test_settings_that_would_train_nothing_or_cut_everything(capsys, tmp_path, tiny, extra, says):  # noqa: F811
    assert says in cli_error(capsys, quick(tiny, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "checkpoint").exists()


def test_a_loss_given_labels_for_other_rows_says_so():
    from minift.errors import MiniftError

    torch.manual_seed(0)
    classifier = build_model(TINY, "classify", num_labels=3)
    with pytest.raises(MiniftError, match="2 rows of logits but labels of shape \\(1,\\)"):
        classifier.loss(torch.zeros(2, 3), [1])
    lm = build_model({"model_type": "gpt2", "vocab_size": 20, "n_embd": 8, "n_layer": 1, "n_head": 2,
                      "n_positions": 16}, "lm")
    with pytest.raises(MiniftError, match="one label per position"):
        lm.loss(torch.zeros(2, 5, 20), torch.zeros(2, 4, dtype=torch.long))


def test_evaluate_refuses_a_head_drawn_at_random(capsys, tiny):  # noqa: F811
    line = cli_error(capsys, ["evaluate", tiny / "model", "--data", tiny / "data.csv"])
    assert "no trained classification head" in line


def test_nan_weights_and_broken_adapter_configs_are_one_line(capsys, tmp_path, tiny):  # noqa: F811
    from safetensors.torch import save_file

    out = tmp_path / "run"
    cli.main(quick(tiny, out, "--lora-r", "2"))
    weights = load_file(str(out / "best" / "model.safetensors"))
    weights["classifier.weight"][0, 0] = float("nan")
    save_file(weights, str(out / "best" / "model.safetensors"))
    assert "not finite" in cli_error(capsys, ["predict", out / "best", "great day"])
    assert "not finite" in cli_error(capsys, ["evaluate", out / "best", "--data", tiny / "data.csv"])
    config = out / "adapter" / "adapter_config.json"
    good = json.loads(config.read_text())
    for broken in ([good], {k: v for k, v in good.items() if k != "r"}):
        config.write_text(json.dumps(broken))
        line = cli_error(capsys, ["predict", tiny / "model", "great day", "--adapter", out / "adapter"])
        assert "is not a LoRA adapter's config" in line


def test_an_encoder_given_chat_rows_is_told_it_is_an_encoder(capsys, tmp_path, tiny):  # noqa: F811
    rows = tmp_path / "chat.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    line = cli_error(capsys, ["finetune", "--task", "instruct", "--model", tiny / "model", "--data", rows,
                              "--out", tmp_path / "out"])
    assert "is an encoder" in line and "chat template" not in line


def test_an_early_stop_is_announced(capsys, tmp_path, tiny):  # noqa: F811
    out = tmp_path / "early"
    cli.main(quick(tiny, out, "--max-steps", "8", "--eval-every", "1", "--patience", "1", "--lr", "1e-12"))
    report = json.loads((out / "results.json").read_text())
    assert report["stopped_early"] and report["steps"] < 8
    assert f"stopped early at step {report['steps']}: 1 evaluations without a better validation accuracy" \
        in capsys.readouterr().out


def test_a_resume_under_another_number_of_processes_says_it_is_not_bitwise(capsys, tmp_path, tiny):  # noqa: F811
    out = tmp_path / "procs"
    cli.main(quick(tiny, out, "--save-every", "1", "--max-steps", "2"))
    state = out / "checkpoint" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["run"]["processes"] = 2  # as if two processes under torchrun had saved it
    state.write_text(json.dumps(saved))
    capsys.readouterr()
    cli.main(quick(tiny, out, "--max-steps", "3", "--resume"))
    assert "the checkpoint was saved by 2 processes, this run has 1" in capsys.readouterr().out


"""What a run leaves in its folder, and the report at its end. Every job ends the same way, with these.

    OUT/log.jsonl      every step and evaluation (train.py)
    OUT/checkpoint/    everything a resume needs (resume.py)
    OUT/best/          the best model on validation: a plain checkpoint that minift and transformers load
    OUT/adapter/       with LoRA: the adapters alone, in peft's layout (the base model + adapter/ = best/)
    OUT/results.json   the report: settings, validation and test metrics, weights moved, wall time
    OUT/report.html    the same as a page, with the learning curves (report.py); `minift report OUT` redraws it

best/ (and adapter/) are written when the model is chosen, not after training, so a run stopped at any
moment leaves a best/ that `minift predict` loads.
"""
import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .checkpoints import family_of, iter_safetensors, load_checkpoint, save_checkpoint
from .errors import MiniftError
from .evaluate import format_metrics
from .files import atomic_write, existing_folder, new_folder, replace_folder
from .lora import lora_layers, merge_and_unload, save_adapter
from .report import cpu_name, write_report


def export_best(model, out_dir):
    """Write `model` as OUT/best/. With LoRA layers: the adapters as OUT/adapter/ and best/ as the merged model
    (W + scale * B A), from a copy, so the model in training is not touched."""
    out_dir = Path(out_dir)
    if lora_layers(model):
        write_folder(out_dir / "adapter", lambda folder: save_adapter(model, folder, model.source))
        model = merge_and_unload(copy.deepcopy(model))
    write_folder(out_dir / "best", lambda folder: save_checkpoint(model, folder))


def write_folder(dest, write):
    """write(folder) into a new folder, then swap it in for `dest`: a crash or a full disk leaves the old one."""
    tmp = new_folder(dest)
    try:
        write(tmp)
    except (OSError, SafetensorError) as e:  # a full disk reaches safetensors' writer as a SafetensorError
        raise MiniftError(f"could not write {dest} ({getattr(e, 'strerror', None) or e}): the previous one is "
                          "intact; free disk space or choose another --out, then resume") from None
    replace_folder(tmp, dest)


def load_best(out_dir, task, device="cpu"):
    """The best model of a run (OUT/best/), on `device`, in eval mode."""
    best = existing_folder(Path(out_dir) / "best")
    if not best.is_dir():
        raise MiniftError(f"{best} does not exist: the run has not evaluated a model yet (give it validation data)")
    return load_checkpoint(best, task, verbose=False).to(device).eval()


def weights_moved(model, source):
    """How far fine-tuning moved the pretrained weights: ||w - w0|| / ||w0|| over every weight the checkpoint folder
    `source` holds (a new head has no pretrained value: it is not counted). w0 is read from the file one tensor at a
    time, so no copy of the whole model is kept for this (a 1.5B model's would be 6 GB in fp32)."""
    family, ours = family_of(model), dict(model.named_parameters())
    num = den = 0.0
    for key, w0 in iter_safetensors(source):
        name, w0 = family.hf_to_ours(key, w0, model)
        if name in ours:
            w0 = w0.float()
            num += float((ours[name].detach().cpu().float() - w0).norm() ** 2)
            den += float(w0.norm() ** 2)
    return (num / den) ** 0.5


def look_at_test_set(folder, again=False):
    """Allow one look at a test set; a second needs again=True. Every look at the test set that changes
    what you do next (another lr, another epoch) makes it a second validation set, and its score stops
    being an honest estimate of how the model does on new data."""
    marker = Path(folder) / "test_looked_at.json"
    if marker.exists() and not again:
        when = json.loads(marker.read_text())["when"]
        raise MiniftError(f"the test set in {folder} was already looked at ({when}); choosing settings by it "
                          "would make its score optimistic: pass again=True (--again) if you really mean to")
    marker.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S")}))


@contextmanager
def after_training(out):
    """Around a job's scoring after train() returned (best/ loaded, the test look): a Ctrl-C there loses nothing, as
    best/ and the last checkpoint are on disk; say so, and how to get the scores without training again."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted after training, while scoring: best/ and the checkpoint are saved in {out}; run the same "
              "command with --resume to score them (no step is repeated)")
        raise


def finish(report, out, t0, use_it):
    """The report's ending, the same for every job: the validation figures of the saved model (measured when
    it was chosen: one number per model and split), the test figures if this run looked, how far the weights
    moved, where things are, how to use the model; then results.json. `use_it`: a line on how to try it."""
    out = Path(out)
    print(f"\nvalidation (best step {report['best_step']}):\n{format_metrics(report['validation'])}")
    if "test" in report:
        print(f"\ntest (held out, looked at once):\n{format_metrics(report['test'])}")
    report["wall_seconds"], report["cpu"] = time.perf_counter() - t0, cpu_name()
    print(f"\nweights moved {report['weights_moved']:.4f} (relative L2 distance from the pretrained ones)")
    print(f"best model saved in {out / 'best'}" + (f", adapter in {out / 'adapter'}" if (out / "adapter").is_dir() else "")
          + f", log in {out / 'log.jsonl'}; total {report['wall_seconds'] / 60:.1f} min")
    print(use_it)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=str)))
    print(f"report page (curves, figures, settings; opens offline): {write_report(out)}")
    return report

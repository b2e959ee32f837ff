"""A model from the local Ollama store (`ollama:NAME[:TAG]`), on a fake store the tests lay out as Ollama does:
manifests/registry.ollama.ai/library/NAME/TAG (JSON, one layer per part) and blobs/sha256-<hex> (the GGUF)."""
import hashlib
import json

import pytest

from minift import hub
from minift.cli import main
from minift.gguf import convert_gguf

from test_gguf import Q, llama_gguf, make_tiny_llama, one_line_error

MODEL, ADAPTER, PROJECTOR = (f"application/vnd.ollama.image.{kind}" for kind in ("model", "adapter", "projector"))


def add_blob(store, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_tag(store, name, tag, layers):
    """layers: [(media type, bytes)]; name 'user/model' goes under registry.ollama.ai/user/model."""
    folder = store / "manifests" / "registry.ollama.ai" / (name if "/" in name else f"library/{name}")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **add_blob(store, b"{}")},
                "layers": [{"mediaType": kind, **add_blob(store, data)} for kind, data in layers]}
    (folder / tag).write_text(json.dumps(manifest))


@pytest.fixture
def store(tmp_path, monkeypatch, transformers):
    """A store holding tiny:latest and tiny:q4 (a llama GGUF), me/tiny:v1, tiny:lora (an adapter alone) and
    tiny:vision (a projector alone); MINIFT_WEIGHTS and OLLAMA_MODELS point into tmp_path."""
    hf, tok = make_tiny_llama(transformers)
    gguf = llama_gguf(tmp_path / "tiny.gguf", hf, tok, [Q.Q8_0, Q.Q4_1]).read_bytes()
    store = tmp_path / "ollama"
    add_tag(store, "tiny", "latest", [(MODEL, gguf), ("application/vnd.ollama.image.template", b"{{ .Prompt }}")])
    add_tag(store, "tiny", "q4", [(MODEL, gguf)])
    add_tag(store, "me/tiny", "v1", [(MODEL, gguf), ("application/vnd.ollama.image.license", b"MIT")])
    add_tag(store, "tiny", "lora", [(ADAPTER, b"GGUF-adapter")])
    add_tag(store, "tiny", "vision", [(PROJECTOR, b"GGUF-projector")])
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path / "weights"))
    return store


def test_names_find_the_model_layer(store, tmp_path):
    blob = hub.ollama_gguf("ollama:tiny")  # the tag defaults to latest
    assert blob.parent == store / "blobs" and blob.read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    assert hub.ollama_gguf("ollama:tiny:q4") == blob == hub.ollama_gguf("ollama:me/tiny:v1")  # one blob, shared
    assert hub.split_ollama_name("ollama:qwen2.5-coder:0.5b") == ("qwen2.5-coder", "0.5b")
    for bad in ("ollama:", "ollama:a:b:c", "ollama::x"):
        assert "ollama:NAME" in one_line_error(hub.split_ollama_name, bad), bad


def test_convert_command_reads_the_store(store, tmp_path, capsys):
    main(["convert", "ollama:tiny:q4", str(tmp_path / "from_ollama")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "from_ollama")
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "from_file")
    for name in hub.HF_FILES:  # byte for byte the conversion of the file itself
        assert (tmp_path / "from_ollama" / name).read_bytes() == (tmp_path / "from_file" / name).read_bytes(), name


def test_resolve_model_converts_once_and_reuses(store, tmp_path, monkeypatch):
    calls = []
    real = hub.convert_gguf
    monkeypatch.setattr(hub, "convert_gguf", lambda src, dest: calls.append(src) or real(src, dest))
    folder = hub.resolve_model("ollama:tiny")
    assert folder == tmp_path / "weights" / "ollama-tiny-latest" and calls == [hub.ollama_gguf("ollama:tiny")]
    assert hub.resolve_model("ollama:tiny:latest") == folder and len(calls) == 1  # reused, not converted again
    assert {p.name for p in folder.iterdir()} == set(hub.HF_FILES)
    assert hub.resolve_model("ollama:me/tiny:v1") == tmp_path / "weights" / "ollama-me-tiny-v1" and len(calls) == 2
    import minift
    model = minift.load("ollama:tiny", task="lm", verbose=False)  # a model name like any other
    assert model.config.num_hidden_layers == 2


def test_what_is_not_a_model_is_named(store, tmp_path, monkeypatch):
    message = one_line_error(hub.ollama_gguf, "ollama:tiny:lora")
    assert ADAPTER in message and "latest, q4, vision" in message, message
    message = one_line_error(hub.resolve_model, "ollama:tiny:vision")
    assert PROJECTOR in message and "latest, lora, q4" in message, message
    message = one_line_error(hub.ollama_gguf, "ollama:tiny:7b")
    assert "not in the Ollama store" in message and "tiny has the tags latest, lora, q4, vision" in message, message
    assert "the store has no llama3" in one_line_error(hub.ollama_gguf, "ollama:llama3")
    assert "ollama pull me/other:latest" in one_line_error(hub.ollama_gguf, "ollama:me/other")
    assert not (tmp_path / "weights").exists()  # nothing converted, nothing half-written


def test_broken_stores_say_what_to_do(store, tmp_path, monkeypatch):
    blob = hub.ollama_gguf("ollama:tiny:q4")
    blob.write_bytes(blob.read_bytes()[:1000])  # a pull that stopped
    message = one_line_error(hub.ollama_gguf, "ollama:tiny:q4")
    assert "1000 bytes, the manifest says" in message and "ollama pull tiny:q4" in message, message
    blob.unlink()
    assert "is missing" in one_line_error(hub.ollama_gguf, "ollama:tiny")
    (store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q4").write_text("{not json")
    assert "not an Ollama manifest" in one_line_error(hub.ollama_gguf, "ollama:tiny:q4")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    message = one_line_error(hub.ollama_gguf, "ollama:tiny")
    assert "no Ollama store at" in message and "OLLAMA_MODELS" in message, message

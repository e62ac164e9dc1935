"""Model card and Hub pushes, without network: huggingface_hub's HfApi.create_repo / upload_folder are patched and
what would be uploaded is checked (files, repo id, privacy, commit message)."""

import math
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, RepoUrl

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.cli import hf_main
from nanogpt_hf.common import UserError
from nanogpt_hf.gpt2 import to_gpt2
from nanogpt_hf.hub import HubPusher, check_repo_id, push_checkpoint, write_model_card
from nanogpt_hf.tokenization import char_tokenizer

INFO = dict(
    repo_id="alice/shakespeare-char",
    dataset="shakespeare_char",
    datasets=["karpathy/tiny_shakespeare"],
    license="mit",
    tags=["shakespeare"],
    recipe="recipes/shakespeare_char.yaml",
    settings={"batch_size": 64, "block_size": 32, "learning_rate": 0.001, "max_iters": 5000, "dropout": 0.2},
    steps=5000,
    tokens_seen=81_920_000,
    train_loss=1.2345,
    val_loss=1.4697,
)


def tiny_model(bias=True):
    config = NanoGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=bias,
                           bos_token_id=None, eos_token_id=None)
    return NanoGPTForCausalLM(config)


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder as training leaves it: model, tokenizer, loss.png, metrics, and state/ (not for the Hub)."""
    folder = tmp_path / "out"
    tiny_model().save_pretrained(folder)
    char_tokenizer("abc\n").save_pretrained(folder)
    (folder / "loss.png").write_bytes(b"\x89PNG fake")
    (folder / "metrics.jsonl").write_text('{"step": 0}\n')
    (folder / "state" / "step-10").mkdir(parents=True)
    (folder / "state" / "step-10" / "optimizer.bin").write_bytes(b"big")
    (folder / ".lock").write_text("")
    return folder


@pytest.fixture
def hub(monkeypatch):
    """Patched Hub: records create_repo and upload_folder calls (with the bytes each commit would upload)."""
    calls = {"repos": [], "commits": [], "gate": None, "fail": None}

    def create_repo(self, repo_id, **kw):
        calls["repos"].append(dict(repo_id=repo_id, **kw))
        namespace = "" if "/" in repo_id else "alice/"  # as the Hub does: a bare name goes under the token's user
        return RepoUrl(f"https://huggingface.co/{namespace}{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kw):
        if calls["gate"] is not None:
            calls["gate"].wait(10)
        if calls["fail"] is not None:
            raise calls["fail"]
        files = {p.name: p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls["commits"].append(dict(repo_id=repo_id, message=commit_message, files=files, **kw))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


UPLOADED = {"README.md", "config.json", "configuration_nanogpt.py", "generation_config.json", "loss.png",
            "metrics.jsonl", "model.safetensors", "modeling_nanogpt.py", "tokenizer.json", "tokenizer_config.json"}


# ---- model card -----------------------------------------------------------------------------------------------------


def test_model_card_has_metadata_loading_architecture_recipe_and_numbers(checkpoint):
    write_model_card(checkpoint, INFO)
    card = ModelCard.load(checkpoint / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"nanogpt", "gpt2", "shakespeare"} <= set(data["tags"])
    assert data["datasets"] == ["karpathy/tiny_shakespeare"] and data["license"] == "mit"

    text = card.text
    assert 'model="alice/shakespeare-char"' in text
    assert "import nanogpt_hf" in text and 'from_pretrained("alice/shakespeare-char", trust_remote_code=True)' in text
    n_params = tiny_model().get_num_params()
    for row in ("| layers | 2 |", "| heads | 2 |", "| width | 32 |", "| context | 32 |", "| vocabulary | 65 |",
                f"| parameters | {n_params:,} "):
        assert row in text, row
    assert "recipes/shakespeare_char.yaml" in text and "| steps | 5,000 |" in text and "81,920,000" in text
    assert f"| train | 1.2345 | {math.exp(1.2345):.2f} |" in text
    assert f"| val | 1.4697 | {math.exp(1.4697):.2f} |" in text
    settings = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert settings == INFO["settings"]
    assert "![training and validation loss](loss.png)" in text  # relative: renders on the Hub and locally


def test_model_card_leaves_out_what_is_unknown(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    write_model_card(tmp_path, {})
    card = ModelCard.load(tmp_path / "README.md")
    assert "datasets" not in card.data.to_dict() and "license" not in card.data.to_dict()
    assert "loss.png" not in card.text and "perplexity" not in card.text
    assert "path/to/this/folder" in card.text


@pytest.mark.parametrize("export, bias", [(False, True), (False, False), (True, False)])
def test_card_snippet_runs_and_counts_parameters(tmp_path, export, bias):
    """The card's example generates from its prompt without passing block_size (pipeline does not slide); the card's
    parameter count is nanoGPT's (an export to GPT-2 gets zero biases)."""
    tok = char_tokenizer("ROMEO:abcdefghijklmnopqrstuvwxyz \n")
    config = NanoGPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=len(tok), bias=bias,
                           bos_token_id=None, eos_token_id=None)
    model = NanoGPTForCausalLM(config)
    folder = tmp_path / "ckpt"
    to_gpt2(model).save_pretrained(folder) if export else model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_model_card(folder, {})
    text = ModelCard.load(folder / "README.md").text
    n_params = NanoGPTForCausalLM(NanoGPTConfig(**{**config.to_dict(), "bias": bias or export})).get_num_params()
    assert f"| parameters | {n_params:,} " in text
    assert ("GPT2LMHeadModel" in text and "nanogpt_hf" not in text.split("## Architecture")[0]) if export else (
        "trust_remote_code=True" in text)
    snippet = text.split("```python\n")[1].split("```")[0]
    assert "ROMEO:" in snippet
    exec(snippet.replace("path/to/this/folder", str(folder)), {})


def test_card_metadata_names_hub_ids_not_local_paths(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("x")
    write_model_card(tmp_path / "m", {"dataset": str(tmp_path / "corpus.txt"), "base_model": str(tmp_path / "m")})
    data = ModelCard.load(tmp_path / "m" / "README.md").data.to_dict()
    assert "datasets" not in data and "base_model" not in data
    write_model_card(tmp_path / "m", {"dataset": "Skylion007/openwebtext", "datasets": ["Skylion007/openwebtext"],
                                      "base_model": "gpt2"})
    data = ModelCard.load(tmp_path / "m" / "README.md").data.to_dict()
    assert data["datasets"] == ["Skylion007/openwebtext"] and data["base_model"] == "gpt2"


# ---- HubPusher (training) -------------------------------------------------------------------------------------------


def test_push_uploads_the_checkpoint_files(checkpoint, hub, capsys):
    pusher = HubPusher("alice/model", private=True, strategy="every_save")
    write_model_card(checkpoint, INFO)
    pusher.on_save(checkpoint, "step 250: val loss 1.61")
    pusher.on_save(checkpoint, "step 500: val loss 1.52")
    pusher.finish(checkpoint, "end")  # every_save: nothing extra at the end

    assert hub["repos"][0] == dict(repo_id="alice/model", private=True, exist_ok=True)
    assert [c["message"] for c in hub["commits"]] == ["step 250: val loss 1.61", "step 500: val loss 1.52"]
    commit = hub["commits"][-1]
    assert commit["repo_id"] == "alice/model"
    assert set(commit["files"]) == UPLOADED  # not state/ (resumable states), not hidden files
    assert commit["files"]["config.json"] == (checkpoint / "config.json").read_bytes()
    assert b"library_name: transformers" in commit["files"]["README.md"]
    assert not list(checkpoint.parent.glob(".hub-upload-*"))  # snapshots cleaned up
    assert "hub: pushed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "strategy, saves, pushed",
    [("end", [True, False], ["end"]), ("best", [True, False, True], ["s0", "s2"]),
     ("every_save", [False, False], ["s0", "s1"])],
)
def test_strategy_decides_which_saves_are_pushed(checkpoint, hub, strategy, saves, pushed):
    pusher = HubPusher("alice/model", strategy=strategy)
    for i, improved in enumerate(saves):
        pusher.on_save(checkpoint, f"s{i}", improved=improved)
        wait(pusher.jobs)
    pusher.finish(checkpoint, "end")
    assert [c["message"] for c in hub["commits"]] == pushed


def test_push_does_not_block_and_uploads_the_state_at_push_time(checkpoint, hub):
    hub["gate"] = threading.Event()
    pusher = HubPusher("alice/model", strategy="every_save")
    start = time.perf_counter()
    pusher.on_save(checkpoint, "step 1")
    assert time.perf_counter() - start < 2 and not pusher.jobs[-1].done()  # the upload waits, training does not
    (checkpoint / "metrics.jsonl").write_text("rewritten by the next save\n")  # training goes on writing
    hub["gate"].set()
    pusher.finish(checkpoint, "end")
    assert hub["commits"][0]["files"]["metrics.jsonl"] == b'{"step": 0}\n'


def test_a_push_still_queued_is_superseded_by_a_newer_one(checkpoint, hub):
    hub["gate"] = threading.Event()
    pusher = HubPusher("alice/model", strategy="every_save")
    pusher.on_save(checkpoint, "step 1")
    while not pusher.jobs[0].running():  # the first upload has started (and waits on the gate)
        time.sleep(0.01)
    pusher.on_save(checkpoint, "step 2")
    pusher.on_save(checkpoint, "step 3")
    hub["gate"].set()
    pusher.finish(checkpoint, "end")
    assert [c["message"] for c in hub["commits"]] == ["step 1", "step 3"]
    assert not list(checkpoint.parent.glob(".hub-upload-*"))


@pytest.mark.parametrize("error", [ConnectionError("Name or service not known"), RuntimeError("boom")])
def test_a_failing_upload_prints_one_line_and_training_goes_on(checkpoint, hub, capsys, error):
    hub["fail"] = error
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    pusher = HubPusher("alice/model", strategy="best")
    pusher.on_save(checkpoint, "step 1", improved=True)  # no exception here ...
    pusher.finish(checkpoint, "end")  # ... nor here
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "failed" in lines[0] and "Traceback" not in err
    assert "nanogpt-hf push" in lines[0]  # says how to retry
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before
    assert not list(checkpoint.parent.glob(".hub-upload-*"))


def test_offline_without_patches_fails_in_one_line(checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no cached token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    HubPusher("alice/model", strategy="end").finish(checkpoint, "end")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "failed" in lines[0]


def test_pushing_a_missing_folder_prints_one_line(tmp_path, hub, capsys):
    pusher = HubPusher("alice/model", strategy="every_save")
    pusher.on_save(tmp_path / "gone", "step 1")
    pusher.finish(tmp_path / "gone", "end")
    assert not hub["commits"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_invalid_repo_id_is_refused_at_the_start():
    check_repo_id("alice/model")
    with pytest.raises(UserError, match="hub_model_id"):
        check_repo_id("my run!")


# ---- nanogpt-hf push (blocking) -------------------------------------------------------------------------------------


def test_push_checkpoint_and_cli(checkpoint, hub, capsys):
    url = push_checkpoint(str(checkpoint), "alice/model", private=True, commit_message="first")
    assert url == "https://huggingface.co/alice/model"
    assert hub["repos"][0]["private"] is True and hub["commits"][0]["message"] == "first"
    assert set(hub["commits"][0]["files"]) == UPLOADED - {"README.md"}

    assert hf_main(["push", str(checkpoint), "alice/model", "--message", "second"]) == 0
    assert hub["repos"][1]["private"] is False and hub["commits"][1]["message"] == "second"
    assert "pushed" in capsys.readouterr().out

    hub["fail"] = ConnectionError("no network")
    with pytest.raises(ConnectionError):
        push_checkpoint(str(checkpoint), "alice/model")
    for argv in (["push", str(checkpoint), "alice/model"], ["push", str(checkpoint / "nope"), "alice/model"]):
        assert hf_main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not list(checkpoint.parent.glob(".hub-upload-*"))


def test_a_bare_repo_name_is_pushed_under_the_users_namespace(checkpoint, hub):
    write_model_card(checkpoint, {})  # written before any repo id was known
    assert push_checkpoint(str(checkpoint), "model") == "https://huggingface.co/alice/model"
    commit = hub["commits"][0]
    assert commit["repo_id"] == "alice/model"
    card = commit["files"]["README.md"].decode()
    assert 'model="alice/model"' in card and "path/to/this/folder" not in card
    assert "path/to/this/folder" in (checkpoint / "README.md").read_text()  # the local card is left as it was
    pusher = HubPusher("model", strategy="end")
    pusher.finish(checkpoint, "end")
    assert pusher.repo_id == "alice/model"  # the id training writes into its next cards

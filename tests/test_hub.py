"""Model card and Hub pushes, without network: huggingface_hub's HfApi.create_repo / create_commit are patched and
what would be uploaded is checked (files, repo id, privacy, commit message)."""

import math
import threading
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, RepoUrl

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.cli import hf_main
from nanogpt_hf.errors import UserError
from nanogpt_hf.hub import HubPusher, architecture, count_parameters, push_checkpoint, write_model_card
from nanogpt_hf.tokenization import char_tokenizer

INFO = dict(
    repo_id="alice/shakespeare-char",
    dataset="shakespeare_char",
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
    """Patched Hub: records create_repo and create_commit calls (with the bytes each commit would upload)."""
    calls = {"repos": [], "commits": [], "gate": None, "fail": None}

    def create_repo(self, repo_id, **kw):
        calls["repos"].append(dict(repo_id=repo_id, **kw))
        namespace = "" if "/" in repo_id else "alice/"  # as the Hub does: a bare name goes under the token's user
        return RepoUrl(f"https://huggingface.co/{namespace}{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kw):
        if calls["gate"] is not None:
            calls["gate"].wait(10)
        if calls["fail"] is not None:
            raise calls["fail"]
        files = {op.path_in_repo: op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                 else Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["commits"].append(dict(repo_id=repo_id, message=commit_message, files=files, **kw))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **kw: {"name": "alice"})
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
    assert data["datasets"] == ["shakespeare_char"] and data["license"] == "mit"

    text = card.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/shakespeare-char")' in text
    assert "import nanogpt_hf" in text and "trust_remote_code=True" in text
    n_params = tiny_model().get_num_params()
    for row in ("| layers | 2 |", "| heads | 2 |", "| width (n_embd) | 32 |", "| block size (context) | 32 |",
                "| vocabulary | 65 |", f"{n_params:,}", "character level"):
        assert row in text, row
    assert "recipes/shakespeare_char.yaml" in text and "5,000" in text and "81,920,000" in text
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
    with pytest.raises(UserError, match="config.json"):
        write_model_card(tmp_path / "empty", {})


@pytest.mark.parametrize("export", [False, True])
def test_card_snippet_runs_on_a_block_64_model(tmp_path, export):
    """The card's example generates from its prompt without passing block_size (pipeline does not slide)."""
    tok = char_tokenizer("ROMEO:abcdefghijklmnopqrstuvwxyz \n")
    config = NanoGPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=len(tok), bos_token_id=None,
                           eos_token_id=None)
    model = NanoGPTForCausalLM(config)
    folder = tmp_path / "ckpt"
    model.save_gpt2(folder) if export else model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_model_card(folder, {})
    snippet = ModelCard.load(folder / "README.md").text.split("```python\n")[1].split("```")[0]
    assert "ROMEO:" in snippet
    exec(snippet.replace("path/to/this/folder", str(folder)), {})


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_from_config_matches_the_model(tmp_path, bias):
    model = tiny_model(bias)
    model.save_pretrained(tmp_path)
    assert count_parameters(architecture(model.config.to_dict())) == model.get_num_params()
    gpt2 = model.to_gpt2()  # GPT-2 names; always with biases
    assert count_parameters(architecture(gpt2.config.to_dict())) == tiny_model(True).get_num_params()


# ---- HubPusher (training) -------------------------------------------------------------------------------------------


def test_push_uploads_the_checkpoint_files_once_the_repo_exists(checkpoint, hub):
    pusher = HubPusher("alice/model", private=True, strategy="every_save")
    write_model_card(checkpoint, INFO)
    pusher.on_save(checkpoint, "step 250: val loss 1.61")
    pusher.on_save(checkpoint, "step 500: val loss 1.52")
    assert pusher.finish(checkpoint, "end") is True  # every_save: nothing extra at the end

    assert hub["repos"] == [dict(repo_id="alice/model", private=True, exist_ok=True, repo_type="model")]
    assert [c["message"] for c in hub["commits"]] == ["step 250: val loss 1.61", "step 500: val loss 1.52"]
    commit = hub["commits"][-1]
    assert commit["repo_id"] == "alice/model" and commit["repo_type"] == "model"
    assert set(commit["files"]) == UPLOADED  # not state/ (resumable states), not hidden files
    assert commit["files"]["config.json"] == (checkpoint / "config.json").read_bytes()
    assert b"library_name: transformers" in commit["files"]["README.md"]
    assert not list(checkpoint.parent.glob(".hub-upload-*"))  # snapshots cleaned up


@pytest.mark.parametrize(
    "strategy, saves, pushed",
    [("end", [True, False], ["end"]), ("best", [True, False, True], ["s0", "s2"]),
     ("every_save", [False, False], ["s0", "s1"])],
)
def test_strategy_decides_which_saves_are_pushed(checkpoint, hub, strategy, saves, pushed):
    pusher = HubPusher("alice/model", strategy=strategy)
    for i, is_best in enumerate(saves):
        pusher.on_save(checkpoint, f"s{i}", is_best=is_best)
        pusher.wait()
    pusher.finish(checkpoint, "end")
    assert [c["message"] for c in hub["commits"]] == pushed


def test_push_does_not_block_and_uploads_the_state_at_push_time(checkpoint, hub):
    hub["gate"] = threading.Event()
    pusher = HubPusher("alice/model", strategy="every_save")
    start = time.perf_counter()
    future = pusher.push(checkpoint, "step 1")
    assert time.perf_counter() - start < 2 and not future.done()  # the upload waits on the gate, training does not
    (checkpoint / "metrics.jsonl").write_text("rewritten by the next save\n")  # training goes on writing
    hub["gate"].set()
    assert pusher.wait() is True
    assert hub["commits"][0]["files"]["metrics.jsonl"] == b'{"step": 0}\n'


def test_a_push_still_queued_is_superseded_by_a_newer_one(checkpoint, hub):
    hub["gate"] = threading.Event()
    pusher = HubPusher("alice/model", strategy="every_save")
    first = pusher.push(checkpoint, "step 1")
    while not first.running():  # the first upload has started (and waits on the gate)
        time.sleep(0.01)
    pusher.push(checkpoint, "step 2")
    pusher.push(checkpoint, "step 3")
    hub["gate"].set()
    pusher.wait()
    assert [c["message"] for c in hub["commits"]] == ["step 1", "step 3"]
    assert not list(checkpoint.parent.glob(".hub-upload-*"))


@pytest.mark.parametrize("error", [ConnectionError("Name or service not known"), RuntimeError("boom")])
def test_a_failing_upload_prints_one_line_and_training_goes_on(checkpoint, hub, capsys, error):
    hub["fail"] = error
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    pusher = HubPusher("alice/model", strategy="best")
    assert pusher.on_save(checkpoint, "step 1", is_best=True) is not None  # no exception here ...
    assert pusher.finish() is False  # ... nor here
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "failed" in lines[0] and "Traceback" not in err
    assert "nanogpt-hf push" in lines[0]  # says how to retry
    assert pusher.failures == 1
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before


def test_offline_without_patches_fails_in_one_line(checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no cached token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    pusher = HubPusher("alice/model", strategy="end")
    assert pusher.finish(checkpoint, "end") is False
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "failed" in lines[0]


def test_pushing_a_missing_folder_prints_one_line(tmp_path, hub, capsys):
    pusher = HubPusher("alice/model", strategy="every_save")
    assert pusher.push(tmp_path / "gone", "step 1") is None
    assert pusher.wait() is False and not hub["commits"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(UserError, match="every_save"):
        HubPusher("alice/model", strategy="sometimes")


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
    with pytest.raises(UserError, match="cannot reach the Hub"):
        push_checkpoint(str(checkpoint), "alice/model")
    assert hf_main(["push", str(checkpoint), "alice/model"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_a_bare_repo_name_is_pushed_under_the_users_namespace(checkpoint, hub):
    write_model_card(checkpoint, {})  # written before any repo id was known
    assert push_checkpoint(str(checkpoint), "model") == "https://huggingface.co/alice/model"
    commit = hub["commits"][0]
    assert commit["repo_id"] == "alice/model"
    card = commit["files"]["README.md"].decode()
    assert 'from_pretrained("alice/model")' in card and "path/to/this/folder" not in card
    assert HubPusher("model").repo_id == "alice/model"  # the id training writes into its cards


def test_card_metadata_names_hub_ids_not_local_paths(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    (tmp_path / "corpus.txt").write_text("x")
    write_model_card(tmp_path / "m", {"dataset": str(tmp_path / "corpus.txt"), "base_model": str(tmp_path / "m")})
    data = ModelCard.load(tmp_path / "m" / "README.md").data.to_dict()
    assert "datasets" not in data and "base_model" not in data
    write_model_card(tmp_path / "m", {"dataset": "Skylion007/openwebtext", "base_model": "gpt2"})
    data = ModelCard.load(tmp_path / "m" / "README.md").data.to_dict()
    assert data["datasets"] == ["Skylion007/openwebtext"] and data["base_model"] == "gpt2"

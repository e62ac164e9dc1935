"""Settings: nanoGPT's config files as recipes, lr_decay_iters following max_iters, the threads setting."""

import pytest

from nanogpt_hf.cli import train_main
from nanogpt_hf.settings import TrainSettings, parse_command

# nanoGPT's config/train_shakespeare_char.py, verbatim
SHAKESPEARE_CHAR_PY = """\
# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
"""


def parse(argv):
    return parse_command(TrainSettings, argv, "train.py", "", recipes=True)


def test_nanogpt_config_file_is_a_recipe(tmp_path):
    (tmp_path / "train_shakespeare_char.py").write_text(SHAKESPEARE_CHAR_PY)
    s, explicit = parse([str(tmp_path / "train_shakespeare_char.py"), "--device=cpu"])
    expected = dict(out_dir="out-shakespeare-char", eval_interval=250, eval_iters=200, log_interval=10,
                    always_save_checkpoint=False, wandb_log=False, wandb_project="shakespeare-char",
                    wandb_run_name="mini-gpt", dataset="shakespeare_char", gradient_accumulation_steps=1,
                    batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, learning_rate=1e-3,
                    max_iters=5000, lr_decay_iters=5000, min_lr=1e-4, beta2=0.99, warmup_iters=100, device="cpu")
    assert explicit == expected and {k: getattr(s, k) for k in expected} == expected
    # nanoGPT's config/train_gpt2.py multiplies; signed numbers and None are literals too
    (tmp_path / "train_gpt2.py").write_text("gradient_accumulation_steps = 5 * 8\nseed = -1\ncompile = None\n")
    s, _ = parse([str(tmp_path / "train_gpt2.py")])
    assert (s.gradient_accumulation_steps, s.seed, s.compile) == (40, -1, None)


@pytest.mark.parametrize("line", ["import os", "out_dir = os.getcwd()", "wandb_run_name = 'ft-' + str(time.time())",
                                  "batch_size = [64]", "n_layer: int = 6", "n_layer = n_head = 6", "n_layer ="])
def test_nanogpt_config_file_is_never_run(tmp_path, capsys, line):
    config = tmp_path / "config.py"
    config.write_text(f"batch_size = 8\n{line}\nopen('{tmp_path}/ran', 'w')\n")
    assert train_main([str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}, line 2") and err.count("\n") == 1 and not (tmp_path / "ran").exists()


def test_lr_decay_iters_follows_max_iters_unless_given(tmp_path):
    for recipe in ["default.yaml", "shakespeare_char.yaml", "shakespeare_char_cpu.yaml", "openwebtext_gpt2.yaml"]:
        assert parse([recipe, "--max_iters=500"])[0].lr_decay_iters is None  # the run's max_iters: 500
    assert parse(["default.yaml", "--max_iters=500", "--lr_decay_iters=300"])[0].lr_decay_iters == 300
    assert TrainSettings().lr_decay_iters is None


def test_threads_setting():
    assert (TrainSettings().threads, parse(["--threads=1"])[0].threads) == (0, 1)
    with pytest.raises(Exception, match="threads"):
        parse(["--threads=-1"])

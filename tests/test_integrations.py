"""The recipes in recipes/ (docs/integrations.md), run as a user would, on a tiny Llama built from
a config, on the CPU: transformers' Trainer, TRL's SFTTrainer, torchrun / accelerate with the
statistics reduced across processes, and the export for serving."""

import importlib
import json
import os
import random
import socket

import pytest
import torch

import cntlora

from helpers import tiny_llama

RECIPES = ("trainer", "sft_trl", "distributed", "export_for_serving")
TRAIN = ["--steps", "24", "--lr", "1e-2", "--batch-size", "8", "--calibration-size", "32", "--max-length", "32"]


def recipe(name):
    return importlib.import_module(f"recipes.{name}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A model folder (tiny Llama + a word-level tokenizer of its 100-token vocabulary) and a
    .txt file of 64 examples that are runs of consecutive words: easy to learn."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_lm")
    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(97)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]")
    model = tiny_llama()
    model.config.pad_token_id, model.config.eos_token_id = 0, 2
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    lines = []
    for _ in range(64):
        start = rng.randrange(97)
        lines.append(" ".join(f"w{(start + j) % 97}" for j in range(rng.randrange(8, 20))))
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return str(root / "model"), str(root / "train.txt")


def _lora(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _run_trainer_recipe(name, trainer_class, tiny_lm, tmp_path, monkeypatch):
    """Run a Trainer-based recipe; returns (trainer, the adapter cntlora made, the adapter training started from)."""
    made, started = {}, {}
    initialize, train = cntlora.initialize, trainer_class.train

    def recording_initialize(*args, **kwargs):
        made["model"] = initialize(*args, **kwargs)
        made["lora"] = _lora(made["model"])
        return made["model"]

    def recording_train(self, *args, **kwargs):
        started["lora"] = _lora(self.model)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(cntlora, "initialize", recording_initialize)
    monkeypatch.setattr(trainer_class, "train", recording_train)
    model_dir, data = tiny_lm
    trainer = recipe(name).main(["--model", model_dir, "--data", data, "--out", str(tmp_path / "adapter"),
                                 "--export", str(tmp_path / "plain"), *TRAIN])
    return trainer, made, started


def _check_trained(trainer, made, started, tmp_path, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the trainer trained cntlora's PeftModel: the same object, from cntlora's factors, and its
    # optimizer holds exactly the LoRA factors
    assert trainer.model is made["model"]
    assert started["lora"].keys() == made["lora"].keys() and len(made["lora"]) == 2 * 14
    assert all(torch.equal(started["lora"][k], made["lora"][k]) for k in made["lora"])
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for k, p in trainer.model.named_parameters() if "lora_" in k}
    # it learned: the loss fell, and B (0 at a subspace start) moved
    losses = _losses(trainer)
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2]) - 0.1, losses
    trained = _lora(trainer.model)
    assert all(float(trained[k].abs().max()) > 0 for k in trained if "lora_B" in k)
    # both folders reproduce the trained model: cntlora's, and the plain PEFT copy without cntlora
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits
        again = cntlora.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "adapter"))
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(tmp_path / "plain"))
        assert torch.allclose(again.eval()(**batch).logits, want, atol=1e-5)
        assert torch.allclose(plain.eval()(**batch).logits, want, atol=1e-5)


def test_trainer_recipe_trains_the_cntlora_adapter(tiny_lm, tmp_path, monkeypatch, one_thread):
    from transformers import Trainer

    trainer, made, started = _run_trainer_recipe("trainer", Trainer, tiny_lm, tmp_path, monkeypatch)
    assert type(trainer) is Trainer
    _check_trained(trainer, made, started, tmp_path, tiny_lm[0])


def test_sft_trl_recipe_trains_the_cntlora_adapter(tiny_lm, tmp_path, monkeypatch, one_thread):
    trl = pytest.importorskip("trl", reason="TRL is the optional extra cntlora[trl]")

    trainer, made, started = _run_trainer_recipe("sft_trl", trl.SFTTrainer, tiny_lm, tmp_path, monkeypatch)
    assert isinstance(trainer, trl.SFTTrainer)
    _check_trained(trainer, made, started, tmp_path, tiny_lm[0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, argv, out):
    """One process as torchrun starts it: the env:// variables, then the recipe's main()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # rank-dependent RNG state must not leak into the adapter
    record = {"saves": 0}
    initialize, save_adapter = cntlora.initialize, cntlora.save_adapter

    def recording_initialize(*args, **kwargs):
        model = initialize(*args, **kwargs)
        record["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record["batches"] = len(args[1])
        return model

    def recording_save(*args, **kwargs):
        record["saves"] += 1
        return save_adapter(*args, **kwargs)

    cntlora.initialize, cntlora.save_adapter = recording_initialize, recording_save
    model = recipe("distributed").main(argv)
    record["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def test_distributed_recipe_reduces_statistics_and_rank0_writes(tiny_lm, tmp_path, one_thread):
    import torch.multiprocessing as mp

    model_dir, data = tiny_lm
    out = tmp_path / "adapter"
    argv = ["--model", model_dir, "--data", data, "--out", str(out), "--base", "residual", "--strength", "none",
            "--steps", "3", "--lr", "1e-2", "--batch-size", "4", "--calibration-size", "32", "--max-length", "32"]
    mp.spawn(_distributed_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    # each rank collected over half of the sample (4 of the 8 batches) ...
    assert r0["batches"] == r1["batches"] == 4
    # ... and both start from the same adapter and residual base, bit for bit
    assert r0["init"].keys() == r1["init"].keys()
    assert all(torch.equal(r0["init"][k], r1["init"][k]) for k in r0["init"])
    # which is the one a single process computes over the whole sample: the sums were reduced
    ru = recipe("distributed").ru
    model, tokenizer = ru.load_causal_lm(model_dir)
    texts = ru.calibration_sample(ru.load_texts(data), 32, 0)
    single = cntlora.initialize(model, ru.lm_batches(tokenizer, texts, 4, 32),
                                cntlora.CNTLoRAConfig(base="residual", strength=None),
                                target_modules=ru.default_targets(model), progress=False).state_dict()
    assert single.keys() == r0["init"].keys()
    for k in single:
        assert torch.allclose(r0["init"][k], single[k], atol=1e-5, rtol=1e-4), k
    # data-parallel training kept the ranks together and moved the adapter
    assert all(torch.equal(r0["final"][k], r1["final"][k]) for k in r0["final"])
    assert any(not torch.equal(r0["final"][k], r0["init"][k]) for k in r0["final"] if "lora_" in k)
    # only rank 0 wrote, and what it wrote is the trained adapter with its residual base
    assert (r0["saves"], r1["saves"]) == (1, 0)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".pt")) == ["adapter"]
    meta = json.loads((out / "cntlora.json").read_text())
    assert meta["base"] == "residual"
    from transformers import AutoModelForCausalLM

    reloaded = cntlora.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).state_dict()
    assert all(torch.equal(reloaded[k], r0["final"][k]) for k in r0["final"])


def test_export_for_serving_loads_with_plain_peft(tiny_lm, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ru = recipe("export_for_serving").ru
    model_dir, data = tiny_lm
    model, tokenizer = ru.load_causal_lm(model_dir)
    batches = ru.lm_batches(tokenizer, ru.load_texts(data)[:16], 8, 32)
    # the hard case: a residual start, then "training" (any change of B and A)
    trained = cntlora.initialize(model, batches, cntlora.CNTLoRAConfig(base="residual", strength=None),
                                 target_modules=ru.default_targets(model), progress=False)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    cntlora.save_adapter(trained, str(tmp_path / "adapter"))
    text = "w3 w4 w5 w6 w7"
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        want = trained.eval()(**batch).logits

    diff = recipe("export_for_serving").main([str(tmp_path / "adapter"), str(tmp_path / "plain"), "--model", model_dir,
                                              "--text", text, "--merge", str(tmp_path / "merged")])
    assert diff <= 1e-4
    # a plain PEFT folder (no cntlora files), rank 2r, on the original, unmodified base
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["r"] == 16
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "plain")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, want, atol=1e-5)
        assert torch.allclose(merged(**batch).logits, want, atol=1e-4)
        # the residual change is undone by the export, not lost: the bare base differs
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(model_dir)(**batch).logits, want, atol=1e-3)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe(name).main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out

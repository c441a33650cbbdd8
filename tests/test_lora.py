"""LoRA (lora.py, train.py --lora): zero-initialised adapters leave the model as it was; only the adapters learn;
checkpoints hold the merged weights (equal to the unmerged model, loading in transformers) and the adapter in
peft's layout (peft loads it onto the base model); --resume continues exactly; the optimizer holds the adapters'
state only."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora
import model as model_module
import train
from checkpoint import from_pretrained
from helpers import Crash, tiny_student

FLAGS = ["--limit", "24", "--batch-size", "4", "--eval-every", "0", "--eval-questions", "2", "--seed", "7", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("tiny") / "m")


def run(student, out, *extra):
    return train.main(["--init", str(student), "--out", str(out), *FLAGS, *extra])


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def straight(student, tmp_path_factory):
    return run(student, tmp_path_factory.mktemp("lora") / "run", "--lora", "4", "--max-steps", "6", "--save-every", "3")


def test_zero_initialised_adapters_leave_the_logits_and_only_they_get_gradients(student):
    model = from_pretrained(student)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids)[0]
    wrapped = lora.add_adapters(model, 4)
    assert len(wrapped) == 2 * 7 and torch.equal(model(ids)[0], before)  # 2 layers x q, k, v, o, gate, up, down
    _, loss = model.train()(ids, torch.roll(ids, -1, 1))
    loss.backward()
    learning = {n for n, p in model.named_parameters() if p.grad is not None}
    assert learning == {f"{n}.{w}" for n in wrapped for w in ("lora_A", "lora_B")}
    assert all(p.requires_grad == (n in learning) for n, p in model.named_parameters())


def test_targets_are_hf_names_and_a_wrong_one_is_named(tmp_path):
    opt = from_pretrained(tiny_student(tmp_path / "opt", model_type="opt"))
    assert lora.add_adapters(opt, 2, targets=("fc1", "out_proj")) == [
        "layers.0.self_attn.o_proj", "layers.0.mlp.up_proj", "layers.1.self_attn.o_proj", "layers.1.mlp.up_proj"]
    with pytest.raises(train.InputError, match=r"--lora-targets: gate_proj names no linear layer of this opt model "
                                               r"\(its layers: fc1, fc2, k_proj, out_proj, q_proj, v_proj\)"):
        lora.add_adapters(from_pretrained(tmp_path / "opt"), 2, targets=("q_proj", "gate_proj"))


def test_training_the_adapters_lowers_the_loss_and_keeps_the_base(student, straight):
    assert losses(straight)[-1] < losses(straight)[0]
    state = torch.load(straight / "last" / train.STATE_FILE, weights_only=True)
    adapters = load_file(str(straight / "last" / "adapter" / lora.ADAPTER_WEIGHTS))
    sizes = sorted(t.numel() for t in adapters.values())
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim() > 0]
    assert len(moments) == 2 * len(adapters) and sorted(t.numel() for t in moments) == sorted(sizes * 2)
    assert sum(t.numel() for t in moments) == 2 * sum(sizes)  # AdamW's two moments of the adapters, nothing else


def test_the_merged_checkpoint_equals_the_unmerged_model_and_loads_in_transformers_and_peft(student, straight):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    unmerged = from_pretrained(student)
    lora.load_adapter(unmerged, straight / "last" / "adapter")
    merged = from_pretrained(straight / "last")
    with torch.no_grad():
        reference = unmerged(ids)[0]
        assert (from_pretrained(student)(ids)[0] - reference).abs().max() > 1e-2  # the adapter learned something
        # fp32: W + s BA merged rounds otherwise than x W + s (x A) B; logits reach ~45, where an ulp is 4e-6
        torch.testing.assert_close(merged(ids)[0], reference, atol=1e-5, rtol=1e-6)
        hf = AutoModelForCausalLM.from_pretrained(straight / "last").eval()
        torch.testing.assert_close(hf(ids).logits, reference, atol=1e-5, rtol=1e-6)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), straight / "last" / "adapter").eval()
        torch.testing.assert_close(peft(ids).logits, reference, atol=1e-5, rtol=1e-6)
    assert json.loads((straight / "last" / "adapter" / lora.ADAPTER_CONFIG).read_text())["r"] == 4
    assert not (straight / "last" / lora.ADAPTER_CONFIG).exists()  # not beside config.json: the folder loads as it is


def test_a_crashed_lora_run_resumes_exactly(student, straight, tmp_path, monkeypatch):
    """A crash inside step 5's forward (the last save was at step 3), then --resume: the uninterrupted run's losses
    and adapter weights, exactly."""
    out, calls, forward = tmp_path / "b", [0], model_module.Transformer.forward

    def crashing(self, idx, targets=None, **kw):
        calls[0] += targets is not None
        if calls[0] == 5:
            raise Crash("inside step 5")
        return forward(self, idx, targets, **kw)
    with monkeypatch.context() as m:
        m.setattr(model_module.Transformer, "forward", crashing)
        with pytest.raises(Crash):
            run(student, out, "--lora", "4", "--max-steps", "6", "--save-every", "3")
    run(student, out, "--lora", "4", "--max-steps", "6", "--save-every", "3", "--resume")
    assert losses(out) == losses(straight)
    a, b = (load_file(str(x / "last" / "adapter" / lora.ADAPTER_WEIGHTS)) for x in (out, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_an_adapter_folder_continues_it(student, straight, tmp_path):
    """--init <adapter/>: its base (base_model_name_or_path) with its adapter, trained on; the first loss is the
    merged model's."""
    out = run(student, tmp_path / "c", "--init", str(straight / "last" / "adapter"), "--max-steps", "1")
    merged = run(student, tmp_path / "m", "--init", str(straight / "last"), "--max-steps", "1", "--lr", "1e-9")
    assert losses(out)[0] == pytest.approx(losses(merged)[0], abs=1e-5)
    assert json.loads((out / "last" / "adapter" / lora.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(student)


def test_a_bf16_base_trains_fp32_adapters_and_saves_a_bf16_checkpoint(student, tmp_path, monkeypatch):
    """--dtype bfloat16 (the default on CUDA; here on a CPU): the frozen base is held in bf16, the adapters and their
    optimizer state in fp32; the loss goes down; the merged checkpoint is bf16 and loads."""
    held = {}
    real = train.Trainer.__init__

    def spy(self, run, model, *a):
        held.update({n: p.dtype for n, p in model.named_parameters()})
        real(self, run, model, *a)
    monkeypatch.setattr(train.Trainer, "__init__", spy)
    out = run(student, tmp_path / "bf16", "--lora", "4", "--max-steps", "6", "--dtype", "bfloat16", "--eval-questions", "0")
    assert {d for n, d in held.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in held.items() if "lora_" not in n} == {torch.bfloat16}
    assert losses(out)[-1] < losses(out)[0]
    assert {t.dtype for t in load_file(str(out / "last" / "model.safetensors")).values()} == {torch.bfloat16}
    from_pretrained(out / "last")


def test_the_lora_flags_need_lora(capsys):
    """An optional feature's flags without the flag that turns it on: refused, naming both (flags.check_args)."""
    for argv, message in ((["--lora-alpha", "8"], "--lora-alpha: only with --lora R"),
                          (["--lora-targets", "q_proj"], "--lora-targets: only with --lora R"),
                          (["--lora", "4", "--lora-dropout", "1.5"], "--lora-dropout: must be in [0, 1], got 1.5")):
        with pytest.raises(SystemExit):
            train.get_args(argv)
        assert message in capsys.readouterr().err, argv

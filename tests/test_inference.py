"""Using a fine-tuned model: ``generate`` and ``eval`` load the base as the run trained it and answer as
the reference implementations do (transformers + PEFT, our own merge, the training loop's evaluation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.adapter_cases import MERGEABLE, adapted, adapter_config, load_base, logits, perturb, rel_err
from tests.conftest import DEMO_CONFIG, ROOT, run_cli
from trainer import config as config_lib
from trainer.config import DataConfig
from trainer.data import DataError
from trainer.data.formats import prompt_ids
from trainer.export import adapter_state_dict, save_adapter
from trainer.inference import GenerationSettings, InferenceError, evaluate_file, load_trained
from trainer.inference.generate import generate_ids
from trainer.model import load_base_model

pytestmark = pytest.mark.unit

GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def base4(tiny_model_dir: Path) -> nn.Module:
    return load_base(tiny_model_dir, "nf4", torch.float32)


def _save(base4: nn.Module, method: str, tiny_model_dir: Path, out: Path, dtype: str = "fp32") -> Path:
    """A perturbed (so non-trivial) ``method`` adapter on the 4-bit base, saved as a run saves it."""
    model = adapted(base4, method)
    perturb(model, std=0.2)
    save_adapter(
        adapter_state_dict(model), model, adapter_config(method), str(tiny_model_dir), out,
        quantization="nf4", dtype=dtype,
    )  # fmt: skip
    return out


def test_every_4bit_base_is_guarded_as_it_loads(tiny_model_dir: Path) -> None:
    """The bitsandbytes CPU repack (ENVIRONMENT trap 1) is off wherever a 4-bit base is loaded: this CPU
    may lack AVX512-BF16 and never repack, so the guard itself is what is checked."""
    from trainer.config import ModelConfig

    model = load_base_model(ModelConfig(path=str(tiny_model_dir), quantization="nf4"), torch.float32,
                            torch.device("cpu"))  # fmt: skip
    flags = [
        m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    ]
    assert flags and not any(flags)


@pytest.mark.parametrize("method", MERGEABLE)
def test_unmerged_in_eval_mode_without_grad_equals_its_merge(
    method: str, base4: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter_dir = _save(base4, method, tiny_model_dir, tmp_path / "adapter")
    unmerged = load_trained(adapter_dir).model
    assert not unmerged.training
    merged = load_trained(adapter_dir, merged=True).model
    with torch.no_grad():
        # float32 rounding of two different sums: measured for LoRA, each forward lies ~6e-6 from the
        # merged model run in float64 (merged 7.0e-6, unmerged 5.6e-6), 1.24e-5 from each other
        assert rel_err(logits(unmerged), logits(merged)) <= 3e-5
    assert rel_err(logits(unmerged), logits(base4)) > 1e-3, "the adapter had no effect"


def _peft_reference(tiny_model_dir: Path, adapter_dir: Path, dtype: torch.dtype) -> nn.Module:
    """transformers + bitsandbytes + PEFT, as a user would write it (with the CPU repack turned off)."""
    from peft import PeftModel

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=dtype, quantization_config=quant, device_map={"": "cpu"}, local_files_only=True
    )
    for m in base.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    # autocast_adapter_dtype=False: the adapter computes in the run's dtype, as it trained (PEFT would
    # otherwise upcast a bf16 adapter to float32).
    return PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False).eval()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_gives_peft_s_greedy_tokens(
    dtype: str, base4: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter_dir = _save(base4, "lora", tiny_model_dir, tmp_path / "adapter", dtype=dtype)
    trained = load_trained(adapter_dir)
    ids = prompt_ids("Why is the sky blue?", trained.data, trained.tokenizer)
    ours = generate_ids(trained, ids, GREEDY)
    reference = _peft_reference(
        tiny_model_dir, adapter_dir, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    )
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
            pad_token_id=trained.tokenizer.pad_token_id, eos_token_id=trained.tokenizer.eos_token_id,
        )  # fmt: skip
    theirs = out[0, len(ids) :].tolist()
    if trained.tokenizer.eos_token_id in theirs:
        theirs = theirs[: theirs.index(trained.tokenizer.eos_token_id)]
    assert len(ours) > 0 and ours == theirs


def test_a_method_peft_lacks_generates_as_its_own_merge(
    base4: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter_dir = _save(base4, "flora", tiny_model_dir, tmp_path / "adapter")
    unmerged, merged = load_trained(adapter_dir), load_trained(adapter_dir, merged=True)
    ids = prompt_ids("Name a colour.", unmerged.data, unmerged.tokenizer)
    assert generate_ids(unmerged, ids, GREEDY) == generate_ids(merged, ids, GREEDY)


def test_mosara_generates_unmerged_and_refuses_merged(
    base4: nn.Module, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter_dir = _save(base4, "mosara", tiny_model_dir, tmp_path / "adapter")
    trained = load_trained(adapter_dir)
    assert len(generate_ids(trained, [1, 5, 9], GREEDY)) > 0
    with pytest.raises(InferenceError, match=r"--merged: mosara cannot be merged .* drop --merged"):
        load_trained(adapter_dir, merged=True)


def test_prompts_follow_the_run_s_template(tiny_model_dir: Path) -> None:
    from trainer.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    instruction = DataConfig.model_validate({"train_path": "x"})
    text = tok.decode(prompt_ids("Hi", instruction, tok), skip_special_tokens=True)
    assert text == "### Instruction:\nHi\n\n### Response:\n"
    chat = DataConfig.model_validate({"train_path": "x", "format": "chat"})
    text = tok.decode(prompt_ids("Hi", chat, tok), skip_special_tokens=True)
    assert text.endswith("<|user|>\nHi\n<|assistant|>\n")


def test_bad_inputs_are_one_clear_error(base4: nn.Module, tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    with pytest.raises(InferenceError, match="run directory holds no adapter/"):
        load_trained(tmp_path / "run")
    with pytest.raises(InferenceError, match="neither a run directory nor an adapter directory"):
        load_trained(tmp_path)
    adapter_dir = _save(base4, "lora", tiny_model_dir, tmp_path / "adapter")
    meta = json.loads((adapter_dir / "riemann_tune.json").read_text())
    moved = dict(meta, base_model=str(tmp_path / "gone"))
    (adapter_dir / "riemann_tune.json").write_text(json.dumps(moved))
    with pytest.raises(InferenceError, match=f"base model {tmp_path / 'gone'} is not there .* --base PATH"):
        load_trained(adapter_dir)
    trained = load_trained(adapter_dir, base=str(tiny_model_dir))
    with pytest.raises(InferenceError, match=r"the prompt is 3 tokens .* exceeds the model's context of \d+"):
        generate_ids(trained, [1, 2, 3], GenerationSettings(max_new_tokens=10**6))
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"eval.jsonl: row 2: field 'response' is missing"):
        evaluate_file(trained, str(bad))


@pytest.mark.integration
def test_eval_gives_the_training_loop_s_loss_and_logs_to_the_run(tmp_path: Path) -> None:
    """A short fp32 run on one worker: ``eval`` on its eval file reports the loss of its last evaluation
    (the same weights, batches and loss code) and logs it to the run's MLflow run and a nested child."""
    out = tmp_path / "run"
    run_cli(
        "train", str(DEMO_CONFIG), "distributed.backend=local", "distributed.num_workers=1",
        "train.dtype=fp32", "train.max_steps=4", "train.eval_every_n_steps=4", "checkpoint.every_n_steps=0",
        f"output.dir={out}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    cfg = config_lib.load(out / "config.yaml")
    proc = run_cli(
        "eval", str(out), "--data", str(cfg.data.eval_path), "--batch-size", str(cfg.train.micro_batch_size),
        "--metrics", "loss,exact_match",
    )  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    assert report["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert "perplexity" in proc.stdout and "exact match" in proc.stdout
    assert len(report["samples"]) == report["examples"] > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/eval/loss"] == pytest.approx(report["loss"])
    run_cli("eval", str(out), "--data", str(cfg.data.eval_path), "--nested")
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'"
    )
    assert len(children) == 1 and "eval/eval/loss" in children[0].data.metrics
    gen = run_cli("generate", str(out), "--prompt", "Why is the sky blue?", "--max-new-tokens", "8")
    assert gen.stdout.strip()


@pytest.mark.integration
def test_cli_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "generate", str(tmp_path), "--prompt", "hi"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr

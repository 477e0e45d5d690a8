"""Distillation from a teacher into a student: teacher answers, SFT and DPO with trl, logit distillation.

Tiny Llamas (one layer, 32 wide) with tokenizers trained offline; every test runs in seconds.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from hf_graft.causal_lm import Schedule, build_causal_lm, exact_match, finetune, tiny_llama_config
from hf_graft.data import addition, pydoc_corpus, train_tokenizer
from hf_graft.distill import (
    DpoSettings,
    LogitSettings,
    SftSettings,
    check_shared_vocabulary,
    distill_logits,
    dpo,
    model_answers,
    preference_pairs,
    sft,
)
from hf_graft.errors import HfGraftError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def task():
    return addition(1, train_size=64, test_size=8)


@pytest.fixture(scope="module")
def tokenizer(task):
    return train_tokenizer([prompt + answer for prompt, answer in task.train] * 5, vocab_size=300)


def _tiny(tokenizer, seed):
    config = tiny_llama_config(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    return build_causal_lm(config, seed=seed)


@pytest.fixture(scope="module")
def teacher(tokenizer, task):
    """A teacher that half-learned the task: its answers are digit strings it ends with eos."""
    model = _tiny(tokenizer, seed=1)
    finetune(model, tokenizer, task.train, Schedule(steps=60, batch_size=16, learning_rate=1e-2), progress=False)
    return model


@pytest.fixture(scope="module")
def answers(teacher, tokenizer, task):
    return model_answers(teacher, tokenizer, [prompt for prompt, _ in task.train], max_new_tokens=3, progress=False)


def test_teacher_answers_are_greedy_and_batched(teacher, tokenizer, task, answers):
    prompts = [prompt for prompt, _ in task.train]
    assert [prompt for prompt, _ in answers] == prompts
    again = model_answers(teacher, tokenizer, prompts, max_new_tokens=3, batch_size=64, progress=False)
    assert again == answers
    assert exact_match(teacher, tokenizer, answers) == 1.0  # they are the teacher's own answers


def test_sft_student_learns_the_teachers_answers(tokenizer, answers):
    student = _tiny(tokenizer, seed=2)
    before = exact_match(student, tokenizer, answers)
    result = sft(student, tokenizer, answers, SftSettings(steps=30, batch_size=16, learning_rate=1e-2), progress=False)
    after = exact_match(result.model, tokenizer, answers)
    assert before == 0.0
    assert after >= 0.25, after
    assert len(result.losses) >= 3 and result.losses[-1] < 0.5 * result.losses[0]


def _answer_logprob(model, tokenizer, prompt, answer):
    """Sum of log-probabilities of ``answer`` + eos after ``prompt``."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum())


def test_dpo_prefers_the_teachers_answer_over_the_students(tokenizer, answers):
    student = _tiny(tokenizer, seed=2)
    own = model_answers(student, tokenizer, [prompt for prompt, _ in answers], max_new_tokens=3, progress=False)
    pairs = preference_pairs(answers, own)
    assert pairs and all(row["chosen"] != row["rejected"] for row in pairs)

    def margin(model):
        return sum(
            _answer_logprob(model, tokenizer, r["prompt"], r["chosen"]) - _answer_logprob(model, tokenizer, r["prompt"], r["rejected"])
            for r in pairs
        ) / len(pairs)

    before = margin(student)
    result = dpo(student, tokenizer, pairs, DpoSettings(steps=6, batch_size=8, learning_rate=5e-3), progress=False)
    assert result.losses and all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert margin(result.model) > before + 1.0


def test_cross_tokenizer_sft(teacher, tokenizer, answers):
    """A student with another vocabulary learns from the teacher's answers as text."""
    other = train_tokenizer(pydoc_corpus().train.split("\n\n")[:200], vocab_size=280)
    assert other.get_vocab() != tokenizer.get_vocab()
    student = _tiny(other, seed=3)
    with pytest.raises(HfGraftError, match="one vocabulary"):
        check_shared_vocabulary(teacher, student, tokenizer, other)
    result = sft(student, other, answers, SftSettings(steps=30, batch_size=16, learning_rate=1e-2), progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert exact_match(result.model, other, answers) >= 0.25


def test_bad_input_raises_before_any_work(teacher, tokenizer, answers, tmp_path):
    with pytest.raises(HfGraftError, match="prompt set is empty"):
        model_answers(teacher, tokenizer, [], max_new_tokens=3)
    with pytest.raises(HfGraftError, match="list of strings"):
        model_answers(teacher, tokenizer, "1+1=", max_new_tokens=3)
    with pytest.raises(HfGraftError, match="at least one"):
        sft(_tiny(tokenizer, 2), tokenizer, [])
    with pytest.raises(HfGraftError, match="preference pair"):
        dpo(_tiny(tokenizer, 2), tokenizer, [])
    other = train_tokenizer(["abc def"] * 10, vocab_size=270)
    with pytest.raises(HfGraftError, match="one vocabulary"):
        distill_logits(teacher, _tiny(other, 2), tokenizer, answers, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(HfGraftError, match="fewer than one batch"):
        distill_logits(teacher, _tiny(tokenizer, 2), tokenizer, answers[:4], LogitSettings(batch_size=8))


LOGIT_SETTINGS = LogitSettings(steps=6, batch_size=8, learning_rate=1e-2, checkpoint_every=3)


def test_kill_and_resume_equals_uninterrupted(teacher, tokenizer, answers, tmp_path):
    whole = distill_logits(teacher, _tiny(tokenizer, 2), tokenizer, answers, LOGIT_SETTINGS, output_dir=tmp_path / "a", progress=False)
    assert len(whole.losses) == 6 and whole.losses[-1] < 0.7 * whole.losses[0]  # the student nears the teacher

    def kill(step, loss):
        if step == 5:  # after the checkpoint of step 3: steps 4 and 5 are lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_logits(teacher, _tiny(tokenizer, 2), tokenizer, answers, LOGIT_SETTINGS, output_dir=tmp_path / "b", on_step=kill, progress=False)
    resumed = distill_logits(teacher, _tiny(tokenizer, 2), tokenizer, answers, LOGIT_SETTINGS, output_dir=tmp_path / "b", progress=False)
    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # A finished run resumes at its end: nothing more is trained.
    again = distill_logits(teacher, _tiny(tokenizer, 9), tokenizer, answers, LOGIT_SETTINGS, output_dir=tmp_path / "b", progress=False)
    assert again.losses == whole.losses
    assert torch.equal(again.model.lm_head.weight, whole.model.lm_head.weight)
    with pytest.raises(HfGraftError, match="other settings"):
        distill_logits(
            teacher, _tiny(tokenizer, 2), tokenizer, answers, LogitSettings(steps=7, batch_size=8), output_dir=tmp_path / "b"
        )


def _logit_setup():
    """A random teacher, its answers and a student to distil into, the same in every process."""
    task = addition(1, train_size=64, test_size=8)
    tokenizer = train_tokenizer([prompt + answer for prompt, answer in task.train] * 5, vocab_size=300)
    teacher = _tiny(tokenizer, seed=1)
    answers = model_answers(teacher, tokenizer, [prompt for prompt, _ in task.train], max_new_tokens=3, progress=False)
    return teacher, _tiny(tokenizer, seed=2), tokenizer, answers


def _distributed_run(out):
    """Body of each process of the 2-process run: distil, then rank 0 writes the student and losses."""
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    teacher, student, tokenizer, answers = _logit_setup()
    result = distill_logits(teacher, student, tokenizer, answers, LOGIT_SETTINGS, accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, os.path.join(out, "student.safetensors"))
        with open(os.path.join(out, "losses.json"), "w") as handle:
            json.dump({"losses": result.losses, "processes": accelerator.num_processes}, handle)


def test_two_processes_match_one(tmp_path):
    """Same global batch of 8 over 2 gloo processes (4 each) as in 1 process.

    The processes are forked by ``accelerate.debug_launcher`` from a fresh interpreter that has
    run no torch kernel yet: a process forked after its CPU thread pools started (as this pytest
    process's have) can block forever in its first parallel kernel. Each process builds the same
    models and data from seeds.

    The gradients are mathematically equal (each process scales its KL sum by the global token
    count and DDP averages); only float32 summation order differs (the all-reduce, per-half
    matmuls), about 1e-7 relative per step. Six AdamW steps at lr 1e-2 keep weight differences
    near 1e-6, so the check is 1e-4 absolute on weights and 1e-5 relative on losses: far below
    one step's change of the weights (about 1e-2), which a mismatch of batches or loss scaling
    would show.
    """
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_distill; from accelerate import debug_launcher; "
        "debug_launcher(test_distill._distributed_run, args=(sys.argv[2],), num_processes=2)"
    )
    subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path)], check=True, timeout=600)
    teacher, student, tokenizer, answers = _logit_setup()
    start = {name: weight.clone() for name, weight in student.state_dict().items()}
    single = distill_logits(teacher, student, tokenizer, answers, LOGIT_SETTINGS, progress=False)
    report = json.loads((tmp_path / "losses.json").read_text())
    assert report["processes"] == 2
    assert report["losses"] == pytest.approx(single.losses, rel=1e-5)
    distributed = load_file(str(tmp_path / "student.safetensors"))
    for name, weight in single.model.state_dict().items():
        torch.testing.assert_close(distributed[name], weight, atol=1e-4, rtol=0)
        if name.endswith("proj.weight"):
            assert (weight - start[name]).abs().max() > 1e-3  # the weights did move

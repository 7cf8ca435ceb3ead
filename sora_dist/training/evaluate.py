"""Periodic evaluation during training: loss and perplexity, generated-answer accuracy, or
classification metrics. Every rank evaluates the whole (small) validation set, so the call is
safe under ZeRO-3, where every forward needs every rank."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..backends import accelerate as engine
from ..data.formats import IGNORE
from .metrics import classification_metrics, pearson


def _batches(examples: Sequence[dict], size: int):
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


@torch.no_grad()
def lm_loss(model: nn.Module, examples: Sequence[dict], collate_fn, batch_size: int, accelerator) -> dict:
    """Token-weighted mean loss over the labelled tokens, and its perplexity."""
    total, tokens = 0.0, 0
    for chunk in _batches(examples, batch_size):
        batch = engine.to_device(collate_fn(chunk), accelerator)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        tokens += int((labels != IGNORE).sum())
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def generate_answers(model: nn.Module, examples: Sequence[dict], tokenizer, batch_size: int, max_new_tokens: int,
                     device, synced_gpus: bool = False) -> list[str]:
    """Greedy continuations of each example's prompt: what precedes its first labelled token.

    This covers instruction data and single-turn chat data alike. Prompts are left-padded.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    for chunk in _batches(examples, batch_size):
        prompts = [e["input_ids"][: first_label(e)] for e in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, synced_gpus=synced_gpus)
        replies += [tokenizer.decode(generated, skip_special_tokens=True) for generated in out[:, width:]]
    return replies


def answer_accuracy(replies: Sequence[str], examples: Sequence[dict], tokenizer) -> float:
    """Share of replies that start with the reference answer (the labelled tokens), case-insensitively."""
    correct = 0
    for reply, example in zip(replies, examples):
        answer = normalize(tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE], skip_special_tokens=True))
        correct += int(answer != "" and normalize(reply).startswith(answer))
    return correct / len(examples)


def generated_accuracy(model: nn.Module, examples: Sequence[dict], tokenizer, batch_size: int, max_new_tokens: int, accelerator) -> dict:
    from transformers.integrations import is_deepspeed_zero3_enabled

    synced = is_deepspeed_zero3_enabled() and accelerator.num_processes > 1
    replies = generate_answers(accelerator.unwrap_model(model), examples, tokenizer, batch_size, max_new_tokens, accelerator.device, synced)
    return {"generated_accuracy": answer_accuracy(replies, examples, tokenizer)}


def first_label(example: dict) -> int:
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE)


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


@torch.no_grad()
def classification(model: nn.Module, examples: Sequence[dict], collate_fn, batch_size: int, accelerator, num_labels: int) -> dict:
    """Accuracy, macro F1 and MCC (or Pearson for a 1-output regression head)."""
    predictions, labels = [], []
    for chunk in _batches(examples, batch_size):
        batch = engine.to_device(collate_fn(chunk), accelerator)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        predictions.append(logits.squeeze(-1) if num_labels == 1 else logits.argmax(-1))
        labels.append(batch["labels"])
    predictions, labels = torch.cat(predictions).cpu(), torch.cat(labels).cpu()
    if num_labels == 1:
        return {"pearson": pearson(predictions, labels.float()), "mse": float(((predictions - labels.float()) ** 2).mean())}
    return classification_metrics(predictions, labels, num_labels)


def make_evaluator(task: str, examples: Sequence[dict], collate_fn, batch_size: int, accelerator,
                   tokenizer=None, num_labels: int = 2, generate_tokens: int = 0) -> Callable[[nn.Module], dict]:
    """The ``evaluate(model) -> metrics`` callback of :func:`sora_dist.training.loop.train`."""

    def evaluate(model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        try:
            if task == "sequence_classification":
                return classification(model, examples, collate_fn, batch_size, accelerator, num_labels)
            metrics = lm_loss(model, examples, collate_fn, batch_size, accelerator)
            if generate_tokens:
                metrics.update(generated_accuracy(model, examples, tokenizer, batch_size, generate_tokens, accelerator))
            return metrics
        finally:
            model.train(was_training)

    return evaluate

"""Attention kernels of sfi-sglang (package ``sfi_sglang.kernels``), each beside its torch reference.

A leaf: tensors in, tensors out. :func:`kernel_set` picks the Triton kernels or their torch
references once, for the device a backend runs on.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from . import candidate_logits, finish_coverage, group_scores, held_mask, plan_step, sfi_decode, topk_select


class KernelSet(NamedTuple):
    """One implementation of each kernel the backend calls (see each module for its arguments)."""

    decode: Callable  # sfi_decode: slow and fast rows of a decode step
    plan_step: Callable  # the decode step's plan
    candidate_logits: Callable  # the Selector's logits from the keys
    group_scores: Callable  # the Selector's scores and the coverage
    held_mask: Callable  # what the previous selection held
    finish_coverage: Callable  # coverage into the per-request state
    topk_select: Callable  # the Selector's top-k


def kernel_set(triton: bool) -> KernelSet:
    """The Triton kernels (``triton``: on a GPU) or their torch references (CPU)."""
    pick = (lambda kernel, ref: kernel) if triton else (lambda kernel, ref: ref)
    return KernelSet(
        decode=pick(sfi_decode.sfi_decode, sfi_decode.sfi_decode_ref),
        plan_step=pick(plan_step.plan_step, plan_step.plan_step_ref),
        candidate_logits=pick(candidate_logits.candidate_logits, candidate_logits.candidate_logits_ref),
        group_scores=pick(group_scores.group_scores, group_scores.group_scores_ref),
        held_mask=pick(held_mask.held_mask, held_mask.held_mask_ref),
        finish_coverage=pick(finish_coverage.finish_coverage, finish_coverage.finish_coverage_ref),
        topk_select=pick(topk_select.topk_select, topk_select.topk_select_ref),
    )

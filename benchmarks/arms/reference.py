"""The reference pi_ref (the SFT model) as a row of every table: evaluated, never trained."""

from __future__ import annotations

from benchmarks.arms.registry import ArmFamily, ArmPlan, Method, register


@register
class Reference(ArmFamily):
    name = "sft"
    methods = (Method("sft", "SFT (reference)", "#949494", "*", "reference", order=0, kl="zero"),)

    def plan(self, c) -> ArmPlan:
        return ArmPlan()  # eval/sft is part of every suite (build_stages adds it)

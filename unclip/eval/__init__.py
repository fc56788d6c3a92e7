"""Evaluation: the pixel judge of ``shapes`` images."""

from .judge import JudgedObject, Judgement, judge, judge_batch, relation_between, score

__all__ = ["JudgedObject", "Judgement", "judge", "judge_batch", "relation_between", "score"]

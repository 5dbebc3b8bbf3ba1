"""Generate tiny random reward models, saved like real ones, for tests, benchmarks and trying
rmserve without a model hub. Their scores are random functions of the input, not judgements.

    rmserve make-tiny-models DIR
      DIR/tiny-rm    sequence classification, 1 label
      DIR/tiny-prm   token classification, 2 labels, step tag <step>
      DIR/tiny-lm    causal LM (a "judge" whose judgements are random text)
      DIR/tiny-vlm   vision-language model (Idefics3; see tiny/vlm.py)

    rmserve make-tiny-models --twins DIR
      also the tiny twins of real reward-model families (their configs scaled down, their chat
      templates and special tokens): tiny/twins.py (Skywork-Reward-V2 Qwen3 and Llama 3.1,
      Skywork-Reward-Gemma-2, the RM-R1 reasoning judge on DeepSeek-R1-Distill-Qwen),
      tiny/qwen2_heads.py (Qwen2.5-Math-PRM, Qwen2.5-Math-RM), tiny/judges.py (DeepSeek-GRM
      on Gemma 2) and tiny/qwen2_5_vl.py (a Qwen2.5-VL judge)

A Llama with head_dim 64 (the CPU attention backend refuses smaller heads), a byte-level BPE
tokenizer trained on a small built-in corpus, and a ChatML-style chat template with tool calls.
"""

from __future__ import annotations

from pathlib import Path

from rmserve.models.tiny.llama import STEP_TAG, make_tiny_text_models
from rmserve.models.tiny.vlm import make_tiny_vlm

__all__ = ["STEP_TAG", "make_tiny_models", "make_twins"]


def make_tiny_models(
    out: Path, *, hidden_size: int = 128, layers: int = 2, max_positions: int = 4096, seed: int = 0
) -> dict[str, Path]:
    """Write tiny-rm, tiny-prm, tiny-lm and tiny-vlm under `out`; return their directories."""
    sizes = {"hidden_size": hidden_size, "layers": layers, "max_positions": max_positions}
    paths = make_tiny_text_models(out, seed=seed, **sizes)
    paths["tiny-vlm"] = make_tiny_vlm(out / "tiny-vlm", **sizes)
    return paths


def make_twins(out: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write every tiny twin under `out`; return their directories."""
    from rmserve.models.tiny.judges import GRM_JUDGE_NAME, make_grm_judge_twin
    from rmserve.models.tiny.qwen2_5_vl import make_qwen2_5_vl_judge_twin
    from rmserve.models.tiny.qwen2_heads import make_qwen2_prm_twin, make_qwen2_rm_twin
    from rmserve.models.tiny.twins import TWINS, build_twin

    paths = {name: build_twin(name, out, seed=seed) for name in TWINS}
    paths["twin-qwen2.5-math-prm"] = make_qwen2_prm_twin(out / "twin-qwen2.5-math-prm", seed=seed)
    paths["twin-qwen2.5-math-rm"] = make_qwen2_rm_twin(out / "twin-qwen2.5-math-rm", seed=seed)
    paths[GRM_JUDGE_NAME] = make_grm_judge_twin(out / GRM_JUDGE_NAME, seed=seed)
    vl = "twin-qwen2.5-vl-judge"
    paths[vl] = make_qwen2_5_vl_judge_twin(out / vl, seed=seed)
    return paths

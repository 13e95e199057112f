"""``importance.expert_score``: the statistic the importance stage orders a MoE parent's routed experts by
(share_gate_norm | frequency), through the real stage on a tiny MoE NemotronH; a dense parent ignores it."""

import random

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import NemotronHConfig, NemotronHForCausalLM

from elastic.arch import ArchError
from elastic.models.nemotron_h import Ranking, arch_of, expert_scores
from elastic.run import CONF_DIR, pipeline
from elastic.rundir import RunDir
from test_bad_input import VOCAB, make_tokenizer  # the tiny BPE tokenizer those tests train

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"M": "linear_attention", "-": "mlp", "*": "full_attention", "E": "moe"}
WORDS = "the a of to and in that is was he for it with as his on be at by had not are but from or".split()
LOUD = 2  # the expert every token routes to whose output is zero: frequent, yet it changes nothing


def _config(pattern: str, **moe) -> NemotronHConfig:
    return NemotronHConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8,
                           n_groups=2, ssm_state_size=8, conv_kernel=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, chunk_size=16, max_position_embeddings=1024,
                           layers_block_type=[KINDS[c] for c in pattern], **moe)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Calibration text and two checkpoints with a tokenizer: a MoE parent (8 experts, top-2) in which expert
    ``LOUD`` of every MoE layer is picked for every token (a large router correction bias) but outputs zero,
    and a dense parent."""
    root = tmp_path_factory.mktemp("expert_score")
    rng = random.Random(0)
    texts = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(60)) for _ in range(3)]
    for i, t in enumerate(texts):
        (root / f"doc{i}.txt").write_text(t)
    tok = make_tokenizer(texts)
    torch.manual_seed(0)
    moe = NemotronHForCausalLM(_config("MEM*E", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                       moe_shared_expert_intermediate_size=48)).eval()
    with torch.no_grad():
        for b in moe.model.layers:
            if b.block_type == "moe":
                b.mixer.gate.weight.normal_()
                b.mixer.gate.e_score_correction_bias[LOUD] = 10.0
                b.mixer.experts.down_proj[LOUD].zero_()
    dense = NemotronHForCausalLM(_config("M-*")).eval()
    for name, model in (("moe", moe), ("dense", dense)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _importance(root, parent: str, run_dir, *overrides) -> RunDir:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"parent.path={root / parent}", f"run_dir={run_dir}", "stage=importance", "device=cpu",
            f"data.files=[{root / 'doc0.txt'},{root / 'doc1.txt'}]", f"data.heldout_files=[{root / 'doc2.txt'}]",
            "data.seq_len=32", "importance.num_sequences=8", "importance.batch_size=4", "importance.depth=false",
            *overrides])
    pipeline(cfg)
    return RunDir(run_dir)


def _experts_order(run: RunDir, layer: int) -> list[int]:
    ranking = Ranking.from_tensors(run.load_tensors("importance/ranking.safetensors"))
    return ranking.width["experts"][layer][0].tolist()


def test_expert_score_picks_the_statistic_the_experts_are_ranked_by(parents, tmp_path):
    """frequency ranks the always-routed zero-output expert first, share_gate_norm (the default) last; each
    stage's ranking is the one built from its raw scores by the chosen statistic, and the raw scores keep both."""
    from elastic.stages.importance import load_ranking

    runs = {s: _importance(parents, "moe", tmp_path / s, f"importance.expert_score={s}")
            for s in ("share_gate_norm", "frequency")}
    arch = arch_of(NemotronHForCausalLM.from_pretrained(parents / "moe"))
    for layer in (1, 4):
        assert _experts_order(runs["frequency"], layer)[0] == LOUD
        assert _experts_order(runs["share_gate_norm"], layer)[-1] == LOUD
    for statistic, run in runs.items():
        raw = run.load_tensors("importance/scores.safetensors")
        assert {"experts.1", "experts_frequency.1"} <= set(raw)
        built = Ranking.from_scores(expert_scores(raw, statistic), arch)
        got = load_ranking(run)
        for layer in (1, 4):
            assert torch.equal(got.width["experts"][layer], built.width["experts"][layer])
    with pytest.raises(ArchError, match="expert score must be one of"):
        _importance(parents, "moe", tmp_path / "bad", "importance.expert_score=norm")


def test_a_dense_parent_ignores_expert_score(parents, tmp_path):
    """No routed experts: the key changes nothing and is not checked (the ranking is the raw scores')."""
    run = _importance(parents, "dense", tmp_path / "d", "importance.expert_score=frequency")
    raw = run.load_tensors("importance/scores.safetensors")
    assert not any(k.startswith("experts") for k in raw)
    arch = arch_of(NemotronHForCausalLM.from_pretrained(parents / "dense"))
    built = Ranking.from_scores(raw, arch).to_tensors()
    got = run.load_tensors("importance/ranking.safetensors")
    assert built.keys() == got.keys() and all(torch.equal(built[k], got[k]) for k in built)

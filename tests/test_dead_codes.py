"""Dead-code restart (sftok.dead_codes) and its stage-0 wiring: unused rows move onto encoder outputs, used
rows stay put, the choice is reproducible, and a codebook trained from a near-zero init stops collapsing."""
import copy

import torch
from torch import nn

from sftok.dead_codes import DeadCodeRestart
from sftok.ema import EMA
from sftok.maskgit_vqgan import VectorQuantizer


def test_only_unused_rows_move_onto_batch_features():
    emb = nn.Embedding(16, 4)
    before = emb.weight.detach().clone()
    features = torch.randn(32, 4) * 5
    ids = torch.tensor([0, 1, 2] * 10 + [3, 3])
    dead = DeadCodeRestart(16, seed=1)(emb, features, ids, step=0)
    assert sorted(dead.tolist()) == list(range(4, 16))
    assert torch.equal(emb.weight[:4], before[:4])
    # every restarted row sits next to one of the features (noise is 1% of their spread)
    dist = torch.cdist(emb.weight[4:].detach(), features).min(dim=1).values
    assert float(dist.max()) < 0.1 * float(features.std()) * 4 ** 0.5


def test_choice_is_reproducible_and_rows_get_a_grace_period():
    a, b = nn.Embedding(8, 3), nn.Embedding(8, 3)
    b.load_state_dict(a.state_dict())
    f, ids = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    ra, rb = DeadCodeRestart(8, seed=3), DeadCodeRestart(8, seed=3)
    ra(a, f, ids, 5), rb(b, f, ids, 5)
    assert torch.equal(a.weight, b.weight)
    again = ra(a, f, ids, 6)          # restarted rows are not dead on the very next step
    assert again.numel() == 0
    state = ra.state_dict()
    rc = DeadCodeRestart(8)
    rc.load_state_dict(state)
    assert torch.equal(rc.usage, ra.usage)


def _train_codebook(restart: bool, steps: int = 60) -> int:
    """A VQ on 32 separate clusters around a common offset (as encoder outputs are), codebook trained by its
    own loss from the usual tiny init: the first rows that move towards the data win every assignment."""
    g = torch.Generator().manual_seed(0)
    centers = 3.0 + torch.randn(32, 8, generator=g)
    vq = VectorQuantizer(256, 8)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
    rs = DeadCodeRestart(256, seed=0)
    for step in range(steps):
        x = centers[torch.randint(0, 32, (64,), generator=g)] + 0.05 * torch.randn(64, 8, generator=g)
        h = x.t().reshape(1, 8, 8, 8)                     # [B=1, C=8, 8, 8]: 64 vectors
        _, ids, loss = vq(h)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if restart:
            rs(vq.embedding, x, ids, step)
    x = centers.t().reshape(1, 8, 4, 8)
    return int(vq.codes(x).unique().numel())


def test_restart_stops_codebook_collapse():
    collapsed, restarted = _train_codebook(False), _train_codebook(True)
    assert collapsed <= 4, collapsed            # the plain VQ maps all 32 clusters to a handful of codes
    assert restarted >= 28, restarted           # with restarts nearly every cluster gets its own code


def test_stage0_restarts_codes_and_keeps_the_ema_row(tmp_path):
    from sftok_platform.config import load_config
    from sftok_platform.train.stages import build_stage
    cfg = load_config("tiny", [f"run.root={tmp_path}", "teacher.codebook_size=1024", "model.teacher_codebook_size=1024"])
    torch.manual_seed(0)
    parts = build_stage("stage0", cfg, {}, torch.device("cpu"))
    ema = EMA(parts.model, 0.999)
    ema.update(parts.model)
    loss, _ = parts.step_module()(torch.rand(4, 3, 64, 64), 0)
    loss.backward()
    out = parts.after_step(0, ema)
    assert out["restarted_codes"] >= 768             # 4 images x 64 codes use at most 256 of 1024 rows
    w = parts.model.quantize.embedding.weight
    assert torch.equal(ema.shadow["quantize.embedding.weight"], w.detach().float())
    state = copy.deepcopy(parts.state_dict())
    parts.load_state_dict(state)
    # past teacher.dead_code_restart_until nothing restarts
    late = int(cfg.teacher.dead_code_restart_until * cfg.stage0.steps)
    parts.step_module()(torch.rand(4, 3, 64, 64), late)
    assert parts.after_step(late, ema) == {}

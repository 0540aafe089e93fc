"""Grounding losses against hand-computed values, the views, BPR and the agreement metric."""

import math

import numpy as np
import pytest
import torch

from sigma_fast.rec.grounding import (
    GroundingModel, Pairs, agreement_report, attribute_pairs, co_interaction_pairs, grounding_loss,
    info_nce_loss, kd_loss, merge_views, neighbour_pairs, recall_at_k, train_bpr,
    train_grounding,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


V = [[1.0, 0.0], [0.6, 0.8], [-1.0, 0.5]]
U = [[0.9, 0.1], [0.0, 1.0], [-0.5, -0.5]]
VID = [[1.0, 2.0], [2.0, 1.0], [0.0, 1.0]]
UID = [[1.0, 1.5], [-1.0, 1.0], [0.3, 1.0]]


def _expected_info_nce(v, u, tau):
    b = len(v)
    s = [[_cos(v[i], u[j]) / tau for j in range(b)] for i in range(b)]
    rows = sum(-_log_softmax_row(s[i])[i] for i in range(b)) / b
    cols = sum(-_log_softmax_row([s[i][j] for i in range(b)])[j] for j in range(b)) / b
    return 0.5 * (rows + cols)


def _expected_kd(vt, vi, ut, ui, tau):
    b = len(vt)
    total = 0.0
    for i in range(b):
        log_q = _log_softmax_row([_cos(vt[i], ut[j]) / tau for j in range(b)])
        log_p = _log_softmax_row([_cos(vi[i], ui[j]) / tau for j in range(b)])
        total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / b


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
def test_info_nce_matches_loops(tau):
    got = info_nce_loss(torch.tensor(V), torch.tensor(U), tau)
    assert got.item() == pytest.approx(_expected_info_nce(V, U, tau), rel=1e-5, abs=1e-6)


def test_info_nce_is_symmetric_in_its_arguments():
    a = info_nce_loss(torch.tensor(V), torch.tensor(U), 0.3)
    b = info_nce_loss(torch.tensor(U), torch.tensor(V), 0.3)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.7])
def test_kd_matches_loops(tau):
    got = kd_loss(torch.tensor(V), torch.tensor(VID), tau, u_text=torch.tensor(U),
                  u_id=torch.tensor(UID))
    assert got.item() == pytest.approx(_expected_kd(V, VID, U, UID, tau), rel=1e-5, abs=1e-6)
    # default columns: the batch against itself
    got_self = kd_loss(torch.tensor(V), torch.tensor(VID), tau)
    assert got_self.item() == pytest.approx(_expected_kd(V, VID, V, VID, tau), rel=1e-5, abs=1e-6)


def test_kd_is_zero_when_spaces_agree_and_teacher_gets_no_gradient():
    v = torch.tensor(V, requires_grad=True)
    vid = torch.tensor(V, requires_grad=True)
    loss = kd_loss(v, vid, 0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss = kd_loss(v, torch.tensor(VID, requires_grad=True), 0.5)
    loss.backward()
    assert v.grad is not None and vid.grad is None


def test_grounding_loss_is_cl_plus_lambda_kd():
    args = [torch.tensor(x) for x in (V, U, VID, UID)]
    tau, lam = 0.2, 0.5
    want = _expected_info_nce(V, U, tau) + lam * _expected_kd(V, VID, U, UID, tau)
    assert grounding_loss(*args, tau=tau, lam=lam).item() == pytest.approx(want, rel=1e-5)
    assert grounding_loss(args[0], args[1], lam=0).item() == pytest.approx(
        _expected_info_nce(V, U, 0.05), rel=1e-5)
    with pytest.raises(ValueError, match="needs v_id"):
        grounding_loss(args[0], args[1])
    with pytest.raises(ValueError, match="tau must be > 0"):
        info_nce_loss(args[0], args[1], 0.0)


# -------------------------------------------------------------------------------- views
def test_co_interaction_pairs_window_order_and_popularity_weight():
    # user 0: 0 1 2 (timestamps shuffled in input), user 1: 0 3, user 2: 0 1
    users = np.array([0, 0, 0, 1, 1, 2, 2])
    items = np.array([2, 0, 1, 0, 3, 1, 0])
    ts = np.array([3, 1, 2, 5, 6, 1, 2])
    view = co_interaction_pairs(users, items, ts, num_items=5, window=1)
    got = {tuple(p): w for p, w in zip(view.pairs.tolist(), view.weights)}
    pop = np.bincount(items, minlength=5)
    assert set(got) == {(0, 1), (1, 2), (0, 3)}
    assert got[(0, 1)] == pytest.approx(2 / math.sqrt(pop[0] * pop[1]))
    assert got[(1, 2)] == pytest.approx(1 / math.sqrt(pop[1] * pop[2]))
    wide = co_interaction_pairs(users, items, ts, num_items=5, window=2)
    assert (0, 2) in {tuple(p) for p in wide.pairs.tolist()}
    assert len(co_interaction_pairs([], [], num_items=3).pairs) == 0
    with pytest.raises(ValueError, match="num_items"):
        co_interaction_pairs(users, items, num_items=3)


def test_attribute_pairs_need_a_shared_genre_and_era():
    genres = [["Drama"], ["Drama", "War"], ["Comedy"], ["Drama", "War"], ["Drama"]]
    years = np.array([1995, 1991, 1994, 1980, np.nan])
    view = attribute_pairs(genres, years, k=3)
    got = {tuple(p): w for p, w in zip(view.pairs.tolist(), view.weights)}
    assert (0, 1) in got and got[(0, 1)] == pytest.approx(0.5)
    assert (0, 3) not in got            # different decade
    assert not any(2 in p for p in got)  # comedy shares no genre
    assert (4, 0) in got and (4, 3) in got  # unknown year matches any era
    assert all(i != j for i, j in got)


def test_neighbour_pairs_topk_ties_to_smaller_index():
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    view = neighbour_pairs(emb, k=1)
    assert view.pairs.tolist() == [[0, 1], [1, 0], [2, 0]]  # item 3 has no positive neighbour
    assert np.allclose(view.weights, 1.0)


def test_merge_views_rescales_each_view_to_its_share():
    a = Pairs(np.array([[0, 1], [1, 2]]), np.array([1.0, 3.0], np.float32))
    b = Pairs(np.array([[2, 3]]), np.array([100.0], np.float32))
    m = merge_views(a, b, shares=[1, 2])
    assert m.pairs.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert np.allclose(m.weights, [0.25, 0.75, 2.0])


# --------------------------------------------------------------------- teacher + tower
def _clustered_problem(seed=0, n_clusters=8, per=16, signal_dims=6, noise_dims=40):
    """Items in clusters (the collaborative truth). Raw text features hide the cluster in a few
    weak dimensions under strong noise; the ID teacher sees the clusters cleanly."""
    rng = np.random.default_rng(seed)
    n = n_clusters * per
    cluster = np.repeat(np.arange(n_clusters), per)
    centres = rng.normal(size=(n_clusters, signal_dims))
    signal = centres[cluster] + 0.1 * rng.normal(size=(n, signal_dims))
    noise = 3.0 * rng.normal(size=(n, noise_dims))
    features = np.concatenate([signal, noise], 1).astype(np.float32)
    id_emb = (centres[cluster] + 0.05 * rng.normal(size=(n, signal_dims))).astype(np.float32)
    train, held = [], []
    for c in range(n_clusters):
        members = np.nonzero(cluster == c)[0]
        half = per // 2
        # train pairs among the first half of every cluster plus links to the second half;
        # held-out pairs only among the second half
        for i in members:
            for j in members[:half]:
                if i != j:
                    train.append((i, j))
        for i in members[half:]:
            for j in members[half:]:
                if i != j:
                    held.append((i, j))
    return features, id_emb, np.array(train), np.array(held)


def test_grounding_improves_agreement_over_raw_features():
    features, id_emb, train, held = _clustered_problem()
    model = train_grounding(features, train, id_emb, dim=16, epochs=15, batch_size=64,
                            lr=1e-2, tau=0.1, seed=0, progress=False)
    grounded = model.embed(features)
    assert grounded.shape == (len(features), 16)
    assert np.allclose(np.linalg.norm(grounded, axis=1), 1.0, atol=1e-5)
    report = agreement_report(held, 15, text=features, id=id_emb, grounded=grounded)
    assert report["grounded"] > report["text"] + 0.3, report
    assert report["grounded"] > 0.8, report
    assert model.history[-1]["loss"] < model.history[0]["loss"]
    # deterministic for a seed
    again = train_grounding(features, train, id_emb, dim=16, epochs=15, batch_size=64,
                            lr=1e-2, tau=0.1, seed=0, progress=False).embed(features)
    assert np.array_equal(grounded, again)


def test_train_grounding_weights_and_bad_input():
    features, id_emb, train, _ = _clustered_problem(n_clusters=2, per=4)
    w = np.ones(len(train), np.float32)
    model = train_grounding(features, train, None, weights=w, dim=4, epochs=1, lam=0.0,
                            progress=False)
    assert model.embed(features).shape == (8, 4)
    with pytest.raises(ValueError, match="needs id_embeddings"):
        train_grounding(features, train, None, epochs=1)
    with pytest.raises(ValueError, match="must index items"):
        train_grounding(features, np.array([[0, 99]]), id_emb, epochs=1)
    with pytest.raises(ValueError, match="id_embeddings must be"):
        train_grounding(features, train, id_emb[:3], epochs=1)


def test_recall_at_k_ties_and_exclusion():
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    # from 0: items 1 and 2 tie, 1 ranks first (smaller index); 0 itself is excluded
    assert recall_at_k(emb, [[0, 1]], k=1) == 1.0
    assert recall_at_k(emb, [[0, 2]], k=1) == 0.0
    assert recall_at_k(emb, [[0, 2]], k=2) == 1.0
    assert recall_at_k(emb, [[0, 3], [1, 0]], k=2) == 0.5


def test_bpr_is_deterministic_and_learns_the_clusters():
    rng = np.random.default_rng(0)
    # two user groups, each interacting with one half of the items
    users, items = [], []
    for u in range(40):
        pool = np.arange(0, 10) if u < 20 else np.arange(10, 20)
        for i in rng.choice(pool, 6, replace=False):
            users.append(u)
            items.append(i)
    users, items = np.array(users), np.array(items)
    a = train_bpr(users, items, num_items=20, dim=8, epochs=30, batch_size=64, lr=0.05,
                  seed=1, progress=False)
    b = train_bpr(users, items, num_items=20, dim=8, epochs=30, batch_size=64, lr=0.05,
                  seed=1, progress=False)
    assert a.shape == (20, 8) and a.dtype == np.float32
    assert np.array_equal(a, b)
    held = [(i, j) for i in range(20) for j in range(20) if i != j and (i < 10) == (j < 10)]
    assert recall_at_k(a, held, k=9) > 0.8


def test_grounding_model_mlp_save_load(tmp_path):
    features, id_emb, train, _ = _clustered_problem(n_clusters=2, per=4)
    model = train_grounding(features, train, id_emb, dim=4, hidden=8, epochs=2, progress=False)
    model.save(tmp_path / "g")
    back = GroundingModel.load(tmp_path / "g")
    assert (back.in_dim, back.dim, back.hidden) == (features.shape[1], 4, 8)
    assert np.array_equal(back.embed(features), model.embed(features))
    assert back.history == model.history
    (tmp_path / "g" / "grounding_config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="expected format"):
        GroundingModel.load(tmp_path / "g")


def test_attribute_pairs_accepts_multi_hot():
    mh = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)
    view = attribute_pairs(mh, k=2)
    assert sorted(map(tuple, view.pairs.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]

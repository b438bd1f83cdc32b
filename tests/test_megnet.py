"""MEGNet blocks, AMDNet and the radius atom graph (scannet_jax.megnet, scannet_jax.radius_graph).

Reference: zoo-reference.md §2.5–2.6 (the released AMDNet code).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal
from scipy.spatial.transform import Rotation

from scannet_jax import megnet
from scannet_jax.radius_graph import radius_neighbors

# --------------------------------------------------------------------------- radius graph


def _brute_force(atoms: Atoms, cutoff: float, reach: int) -> dict[tuple, float]:
    """(i, j, shift) -> distance for every image within `reach` cells: plain loops."""
    cell, pos = atoms.cell[:], atoms.get_positions()
    ranges = [range(-reach, reach + 1) if p else range(1) for p in atoms.pbc]
    pairs = {}
    for shift in itertools.product(*ranges):
        for i, j in itertools.product(range(len(atoms)), repeat=2):
            d = float(np.linalg.norm(pos[j] + np.asarray(shift) @ cell - pos[i]))
            if 1e-8 < d <= cutoff:
                pairs[(i, j, shift)] = d
    return pairs


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False), (False, False, False)])
def test_radius_graph_matches_brute_force(pbc):
    # A skewed 3-atom cell, atoms outside the home cell, a 5 Å cutoff over 2–3 cells.
    cell = [[3.1, 0.0, 0.0], [1.4, 2.7, 0.0], [0.6, -0.9, 2.4]]
    atoms = Atoms("MgO2", positions=[[0.2, 0.1, 0.3], [-1.9, 3.4, 1.2], [4.6, 0.7, -2.8]],
                  cell=cell, pbc=pbc)
    nb = radius_neighbors(atoms, cutoff=5.0)
    expected = _brute_force(atoms, 5.0, reach=6)
    found = {(int(i), int(j), tuple(int(s) for s in shift)): d
             for i, j, shift, d in zip(nb.receivers, nb.senders, nb.shifts, nb.distances)}
    assert len(found) == len(nb.receivers) == len(expected) > 0
    assert found.keys() == expected.keys()
    np.testing.assert_allclose([found[k] for k in expected], list(expected.values()), rtol=1e-12)
    assert np.all(np.diff(nb.receivers) >= 0)
    for i in range(len(atoms)):  # within one receiver, by distance
        assert np.all(np.diff(nb.distances[nb.receivers == i]) >= 0)


def test_radius_graph_counts_and_boundary():
    # fcc Cu, a = 3.6 Å: shells of 12 (2.546), 6 (3.6), 24 (4.409) within 5 Å; the next (5.09) out.
    nb = radius_neighbors(bulk("Cu", "fcc", a=3.6), cutoff=5.0)
    assert len(nb.receivers) == 42
    np.testing.assert_allclose(np.unique(nb.distances.round(3)), [2.546, 3.6, 4.409])
    # A pair exactly at the cutoff is kept; an isolated atom has no edge.
    pair = radius_neighbors(Atoms("H3", positions=[[0, 0, 0], [5, 0, 0], [20, 0, 0]]), cutoff=5.0)
    np.testing.assert_array_equal(pair.receivers, [0, 1])
    np.testing.assert_array_equal(pair.senders, [1, 0])
    with pytest.raises(ValueError, match="cutoff must be positive"):
        radius_neighbors(bulk("Cu"), cutoff=0.0)


# --------------------------------------------------------------------------- graphs for the models


def _mgo() -> Atoms:
    return bulk("MgO", "rocksalt", a=4.21)


def _rutile() -> Atoms:
    return crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                   cellpar=[4.594, 4.594, 2.959, 90, 90, 90])


def _atom_graph(atoms: Atoms) -> jraph.GraphsTuple:
    nb = radius_neighbors(atoms, cutoff=5.0)
    return jraph.GraphsTuple(
        nodes={"atomic_numbers": atoms.numbers.astype(np.int32)},
        edges={"distances": nb.distances.astype(np.float32)},
        senders=nb.senders.astype(np.int32), receivers=nb.receivers.astype(np.int32),
        n_node=np.array([len(atoms)], np.int32), n_edge=np.array([len(nb.receivers)], np.int32),
        globals={"state": np.zeros((1, 2), np.float32)})


def _motif_graph(num_motifs: int, num_edges: int, seed: int) -> jraph.GraphsTuple:
    rng = np.random.default_rng(seed)
    return jraph.GraphsTuple(
        nodes={"features": rng.uniform(0, 1, (num_motifs, 61)).astype(np.float32)},
        edges={"distances": rng.uniform(0, 8, num_edges).astype(np.float32)},
        senders=rng.integers(0, num_motifs, num_edges).astype(np.int32),
        receivers=np.sort(rng.integers(0, num_motifs, num_edges)).astype(np.int32),
        n_node=np.array([num_motifs], np.int32), n_edge=np.array([num_edges], np.int32),
        globals={"state": np.zeros((1, 2), np.float32)})


def _pad(graphs: list[jraph.GraphsTuple], n_node: int, n_edge: int, n_graph: int
         ) -> jraph.GraphsTuple:
    return jraph.pad_with_graphs(jraph.batch_np(graphs), n_node, n_edge, n_graph)


def _permute(graph: jraph.GraphsTuple, order: np.ndarray, key: str) -> jraph.GraphsTuple:
    """The same graph with its nodes renumbered (node k of the new graph is old node order[k])
    and its edges shuffled."""
    new_index = np.argsort(order)
    edge_order = np.random.default_rng(0).permutation(len(graph.senders))
    return graph._replace(
        nodes={key: graph.nodes[key][order]},
        edges={"distances": graph.edges["distances"][edge_order]},
        senders=new_index[graph.senders][edge_order].astype(np.int32),
        receivers=new_index[graph.receivers][edge_order].astype(np.int32))


@pytest.fixture(scope="module")
def atom_graphs() -> list[jraph.GraphsTuple]:
    return [_atom_graph(_mgo()), _atom_graph(_rutile())]


@pytest.fixture(scope="module")
def motif_graphs() -> list[jraph.GraphsTuple]:
    return [_motif_graph(1, 18, seed=0), _motif_graph(2, 20, seed=1)]


# Two padding budgets (nodes, edges, graphs) for all model tests, so each model runs on two shapes.
ATOMS, MOTIFS = (16, 600, 3), (4, 40, 3)
ATOMS_WIDE, MOTIFS_WIDE = (40, 1000, 6), (9, 77, 6)


# Jitted once per padding budget (compiling the whole model beats op-by-op dispatch here).
_amdnet = jax.jit(megnet.AMDNet().apply, static_argnames="train")
_megnet = jax.jit(megnet.MEGNet().apply, static_argnames="train")


def _random_params(model, *inputs, seed: int = 0):
    """Parameters of `model`'s shapes (traced, not compiled) drawn at Glorot-like scale."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)
    scale = lambda s: 1 / np.sqrt(s.shape[0]) if len(s.shape) == 2 else 0.1  # noqa: E731
    return jax.tree.map(lambda s: (scale(s) * rng.normal(size=s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def amdnet_params(atom_graphs, motif_graphs):
    return _random_params(megnet.AMDNet(), _pad(atom_graphs, *ATOMS), _pad(motif_graphs, *MOTIFS))


@pytest.fixture(scope="module")
def megnet_params(atom_graphs):
    return _random_params(megnet.MEGNet(), _pad(atom_graphs, *ATOMS), seed=1)


# --------------------------------------------------------------------------- parameter counts


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def test_parameter_counts_match_the_reference_architecture(amdnet_params, megnet_params):
    """Hand count of the released `megnet_block` / `Hierarch_MEGNetModel` (zoo-reference §2.6)."""
    ff = lambda n_in: _dense(n_in, 64) + _dense(64, 32)  # noqa: E731
    megnet_layer = (_dense(4 * 32, 64) + _dense(64, 64) + _dense(64, 32)  # φ_e on [v_i, v_j, e, u]
                    + 2 * (_dense(3 * 32, 64) + _dense(64, 64) + _dense(64, 32)))  # φ_v, φ_u
    set2set = _dense(32, 16) + 32 * 64 + 64  # memory, recurrent kernel and bias
    trunk = 3 * megnet_layer + 2 * 3 * ff(32) + 2 * set2set + _dense(96, 32) + _dense(32, 16)
    atom_branch = 95 * 16 + ff(16) + ff(100) + ff(2) + trunk + _dense(16, 16)
    motif_branch = ff(61) + ff(100) + ff(2) + trunk + _dense(16, 16)
    head = _dense(32, 32) + _dense(32, 1)
    assert (atom_branch, motif_branch, head) == (168_016, 169_376, 1_089)  # ≈168.0k, 169.4k, 1,089
    p = amdnet_params["params"]
    assert _count(p["atoms"]) + _count(p["atom_branch"]) == atom_branch
    assert _count(p["motif_branch"]) == motif_branch
    assert _count(p["last"]) + _count(p["output"]) == head
    assert _count(amdnet_params) == 338_481
    # MEGNet alone: the atom branch with a linear Dense(1) output instead of Dense(16).
    assert _count(megnet_params) == atom_branch - _dense(16, 16) + _dense(16, 1) == 167_761


# --------------------------------------------------------------------------- blocks vs NumPy


def _np_mlp(p, x, act):
    for k in range(len(p)):
        x = x @ np.asarray(p[f"dense_{k}"]["kernel"]) + np.asarray(p[f"dense_{k}"]["bias"])
        if k < len(p) - 1:
            x = act(x)
    return x


def test_megnet_layer_matches_a_loop_over_edges(atom_graphs):
    graphs = _pad(atom_graphs, 12, 460, 4)
    rng = np.random.default_rng(3)
    v, e, u = (rng.normal(size=shape).astype(np.float32) for shape in [(12, 32), (460, 32), (4, 32)])
    inputs = (jnp.asarray(v), jnp.asarray(e), jnp.asarray(u), graphs)
    layer = megnet.MEGNetLayer()
    params = _random_params(layer, *inputs, seed=3)
    v1, e1, u1 = jax.jit(layer.apply)(params, *inputs)
    p = params["params"]
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    for g, (first_node, first_edge) in enumerate([(0, 0), (2, int(graphs.n_edge[0]))]):
        nodes = range(first_node, first_node + int(graphs.n_node[g]))
        edges = range(first_edge, first_edge + int(graphs.n_edge[g]))
        e_new = {k: _np_mlp(p["phi_e"], np.concatenate(
            [v[graphs.receivers[k]], v[graphs.senders[k]], e[k], u[g]]), relu) for k in edges}
        v_new = {}
        for i in nodes:
            into = [e_new[k] for k in edges if graphs.receivers[k] == i]
            v_new[i] = _np_mlp(p["phi_v"], np.concatenate([np.mean(into, 0), v[i], u[g]]), relu)
        u_new = _np_mlp(p["phi_u"], np.concatenate([np.mean(list(e_new.values()), 0),
                                                    np.mean(list(v_new.values()), 0), u[g]]), relu)
        np.testing.assert_allclose(np.asarray(e1)[list(edges)], np.stack(list(e_new.values())),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v1)[list(nodes)], np.stack(list(v_new.values())),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(u1)[g], u_new, rtol=1e-4, atol=1e-5)


def _np_set2set(p, x, groups, steps=3, n=16):
    """The released `Set2Set.call` transcribed: zero cell state every step, unshifted exp."""
    hard_sigmoid = lambda z: np.clip(0.2 * z + 0.5, 0, 1)  # noqa: E731
    m = x @ np.asarray(p["memory"]["kernel"]) + np.asarray(p["memory"]["bias"])
    kernel, bias = np.asarray(p["recurrent_kernel"]), np.asarray(p["recurrent_bias"])
    q = np.zeros((len(groups), 2 * n))
    for _ in range(steps):
        z = q @ kernel + bias
        c = hard_sigmoid(z[:, n:2 * n]) * 0.0 + hard_sigmoid(z[:, :n]) * np.tanh(z[:, 2 * n:3 * n])
        h = hard_sigmoid(z[:, 3 * n:]) * np.tanh(c)
        r = np.zeros((len(groups), n))
        for g, rows in enumerate(groups):
            if rows:
                a = np.exp(m[rows] @ h[g])
                r[g] = (a / a.sum()) @ m[rows]
        q = np.concatenate([h, r], axis=1)
    return q


def test_set2set_keeps_the_released_quirks():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 32)).astype(np.float32)
    segments = jnp.array([0, 0, 0, 1, 1, 2, 2])
    mask = jnp.array([True] * 5 + [False] * 2)  # graph 2 is padding, graph 3 empty
    module = megnet.Set2Set()
    x = jnp.asarray(x)
    params = jax.jit(module.init, static_argnums=4)(jax.random.key(5), x, segments, mask, 4)
    p = params["params"]
    np.testing.assert_array_equal(p["recurrent_bias"], [0] * 16 + [1] * 16 + [0] * 32)
    kernel = np.asarray(p["recurrent_kernel"])
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(32), atol=1e-5)  # orthogonal rows
    apply = jax.jit(module.apply, static_argnums=4)
    out = np.asarray(apply(params, x, segments, mask, 4))
    assert out.shape == (4, 32)
    expected = _np_set2set(p, np.asarray(x), [[0, 1, 2], [3, 4], [], []])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # The forget gate's weights do nothing: the cell state is never carried over.
    changed = jax.tree.map(lambda a: a, params)
    changed["params"]["recurrent_kernel"] = params["params"]["recurrent_kernel"].at[:, 16:32].add(3.0)
    changed["params"]["recurrent_bias"] = params["params"]["recurrent_bias"].at[16:32].add(-2.0)
    np.testing.assert_array_equal(apply(changed, x, segments, mask, 4), out)


def test_activations():
    x = jnp.array([-5.0, -2.5, 0.0, 1.0, 2.5, 5.0])
    np.testing.assert_allclose(megnet.keras_hard_sigmoid(x), [0, 0, 0.5, 0.7, 1, 1], atol=1e-7)
    np.testing.assert_allclose(megnet.softplus2(x), np.log1p(np.exp(np.asarray(x))) - np.log(2),
                               rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- models


def test_outputs_shapes_and_padding(atom_graphs, motif_graphs, amdnet_params, megnet_params):
    graphs, motifs_ = _pad(atom_graphs, *ATOMS_WIDE), _pad(motif_graphs, *MOTIFS_WIDE)
    y = _amdnet(amdnet_params, graphs, motifs_, train=False)
    assert y.shape == (6,) and y.dtype == jnp.float32
    assert np.all(np.isfinite(y)) and np.all(np.asarray(y)[2:] == 0)
    z = _megnet(megnet_params, _pad(atom_graphs, *ATOMS), train=False)
    assert z.shape == (3,) and z[2] == 0 and np.all(np.asarray(z)[:2] != 0)
    with pytest.raises(ValueError, match="differ in graph slots: 6 vs 3"):
        _amdnet(amdnet_params, graphs, _pad(motif_graphs, *MOTIFS))


def test_amdnet_invariant_to_padding_batch_order_and_composition(atom_graphs, motif_graphs,
                                                                 amdnet_params):
    apply = lambda a, m: np.asarray(_amdnet(amdnet_params, a, m))  # noqa: E731
    reference = apply(_pad(atom_graphs, *ATOMS), _pad(motif_graphs, *MOTIFS))[:2]
    assert np.all(np.isfinite(reference)) and abs(reference[0] - reference[1]) > 1e-3
    check = lambda y, ref: np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)  # noqa: E731
    # More padding everywhere.
    check(apply(_pad(atom_graphs, *ATOMS_WIDE), _pad(motif_graphs, *MOTIFS_WIDE))[:2], reference)
    # Each structure alone, and the two in reverse order.
    for k in range(2):
        check(apply(_pad([atom_graphs[k]], *ATOMS), _pad([motif_graphs[k]], *MOTIFS))[0],
              reference[k])
    check(apply(_pad(atom_graphs[::-1], *ATOMS), _pad(motif_graphs[::-1], *MOTIFS))[:2],
          reference[::-1])
    # Renumbered atoms and motifs, shuffled edges.
    permuted_atoms = [_permute(atom_graphs[0], np.array([1, 0]), "atomic_numbers"),
                      _permute(atom_graphs[1], np.array([3, 0, 5, 1, 4, 2]), "atomic_numbers")]
    permuted_motifs = [motif_graphs[0], _permute(motif_graphs[1], np.array([1, 0]), "features")]
    check(apply(_pad(permuted_atoms, *ATOMS), _pad(permuted_motifs, *MOTIFS))[:2], reference)


def test_megnet_invariant_to_rotation_and_atom_order(megnet_params):
    atoms = _rutile()
    atoms.rattle(0.05, seed=2)
    reference = np.asarray(_megnet(megnet_params, _pad([_atom_graph(atoms)], *ATOMS)))[0]
    rotated = atoms.copy()
    rotation = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    rotated.set_cell(atoms.cell[:] @ rotation.T, scale_atoms=True)
    rotated.positions += 0.7  # and translated
    shuffled = atoms[np.array([4, 2, 0, 5, 1, 3])]
    for other in (rotated, shuffled):
        y = np.asarray(_megnet(megnet_params, _pad([_atom_graph(other)], *ATOMS)))[0]
        np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-6)


def test_gradients_finite_with_isolated_atoms_and_empty_graphs():
    # An atom with no neighbour within 5 Å (no edge at all), a one-motif self-loop graph, and
    # empty padding graphs; a narrow one-block model (compiles faster, same operations).
    lonely = _atom_graph(Atoms("Mg", positions=[[0, 0, 0]], cell=[12, 12, 12], pbc=True))
    assert int(lonely.n_edge[0]) == 0
    motif = _motif_graph(1, 1, seed=7)._replace(
        edges={"distances": np.zeros(1, np.float32)}, senders=np.zeros(1, np.int32),
        receivers=np.zeros(1, np.int32))
    graphs = _pad([lonely, _atom_graph(_mgo())], *ATOMS_WIDE)
    motifs_ = _pad([motif, motif], *MOTIFS_WIDE)
    model = megnet.AMDNet(num_blocks=1, n1=16, n2=8, n3=4, num_output_embedding=4,
                          num_last_layer=8)
    params = _random_params(model, graphs, motifs_, seed=2)
    targets = jnp.array([1.0, 2.0, 0.0, 0.0, 0.0, 0.0])

    @jax.jit
    def loss(params, graphs, motifs_):
        y = model.apply(params, graphs, motifs_, train=True)
        return jnp.sum(jraph.get_graph_padding_mask(graphs) * (y - targets) ** 2)

    value, grads = jax.value_and_grad(loss)(params, graphs, motifs_)
    assert np.isfinite(value)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_initialisation_follows_keras():
    @jax.jit
    def init(key):
        embedding = megnet.AtomEmbedding().init(key, jnp.zeros(4, jnp.int32))
        return embedding, megnet.MLP((64, 32), jax.nn.relu).init(key, jnp.zeros((1, 128)))

    embedding, mlp = init(jax.random.key(3))
    table = np.asarray(embedding["params"]["embedding"]["embedding"])
    assert table.shape == (95, 16) and np.abs(table).max() <= 0.05 and table.std() > 0.02
    np.testing.assert_array_equal(mlp["params"]["dense_0"]["bias"], 0)
    kernel = np.asarray(mlp["params"]["dense_0"]["kernel"])
    assert kernel.shape == (128, 64) and np.abs(kernel).max() <= np.sqrt(6 / (128 + 64))  # Glorot

import hashlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from brokerfl.handlers.datasets import load_dataset
from brokerfl.handlers.trainer import build_mlp, evaluate, init_parameters, train_local

HIDDEN = (32, 16)
ARCH = dict(hidden=HIDDEN, num_classes=10)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture()
def params(digits) -> dict[str, np.ndarray]:
    return init_parameters(digits.num_features, HIDDEN, 10, seed=0)


def read_only(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mimic what the runtime delivers: read-only views of shared buffers."""
    out = {}
    for k, v in p.items():
        view = v.view()
        view.flags.writeable = False
        out[k] = view
    return out


def digest(p: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(p):
        h.update(k.encode())
        h.update(np.ascontiguousarray(p[k]).tobytes())
    return h.hexdigest()


def test_build_mlp_layout() -> None:
    model = build_mlp(64, [32, 16], 10)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model(torch.zeros(3, 64)).shape == (3, 10)
    assert [type(m).__name__ for m in build_mlp(64, [], 10)] == ["Linear"]


def test_init_parameters_deterministic_and_isolated_from_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = init_parameters(64, HIDDEN, 10, seed=7)
    assert torch.equal(state, torch.random.get_rng_state()), "global RNG must be untouched"
    b = init_parameters(64, HIDDEN, 10, seed=7)
    c = init_parameters(64, HIDDEN, 10, seed=8)
    assert list(a) == list(build_mlp(64, HIDDEN, 10).state_dict())
    assert digest(a) == digest(b) != digest(c)
    assert all(v.dtype == np.float32 and v.flags.writeable for v in a.values())
    # Default-torch-like scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert np.abs(a["0.weight"]).max() <= 1 / 8 and np.abs(a["0.weight"]).max() > 0.1


def test_train_local_deterministic_read_only_inputs_untouched(digits, params) -> None:
    x, y = digits.x_train[:300], digits.y_train[:300]
    before = {k: v.copy() for k, v in params.items()}
    kwargs = dict(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, seed=3, **ARCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable array" UserWarning
        a, stats_a = train_local(read_only(params), x, y, **kwargs)
    b, stats_b = train_local(read_only(params), x, y, **kwargs)
    c, _ = train_local(read_only(params), x, y, **{**kwargs, "seed": 4})
    assert digest(a) == digest(b) != digest(c)
    assert stats_a == stats_b and stats_a["num_samples"] == 300
    assert all(np.array_equal(before[k], params[k]) for k in params)
    assert list(a) == list(params)
    for k in params:
        assert a[k].dtype == np.float32 and a[k].shape == params[k].shape
        assert a[k].flags.writeable and not np.shares_memory(a[k], params[k])


def test_train_local_deterministic_across_processes(digits, params) -> None:
    script = (
        "import hashlib, numpy as np\n"
        "from brokerfl.handlers.datasets import load_dataset\n"
        "from brokerfl.handlers.trainer import init_parameters, train_local\n"
        "d = load_dataset('digits')\n"
        "p = init_parameters(d.num_features, (32, 16), 10, seed=0)\n"
        "q, _ = train_local(p, d.x_train[:300], d.y_train[:300], hidden=(32, 16), num_classes=10,\n"
        "                   epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=3)\n"
        "h = hashlib.sha256()\n"
        "for k in sorted(q): h.update(k.encode()); h.update(np.ascontiguousarray(q[k]).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    here, _ = train_local(
        params,
        digits.x_train[:300],
        digits.y_train[:300],
        epochs=2,
        batch_size=16,
        lr=0.05,
        momentum=0.9,
        seed=3,
        **ARCH,
    )
    assert child.stdout.strip() == digest(here)


def test_train_local_lowers_loss_and_evaluate_beats_chance(digits, params) -> None:
    x, y = digits.x_train, digits.y_train
    start = evaluate(params, x, y, **ARCH)
    trained, stats = train_local(params, x, y, epochs=3, batch_size=32, lr=0.05, momentum=0.9, **ARCH)
    end = evaluate(trained, x, y, **ARCH)
    assert end["loss"] < 0.5 * start["loss"]
    assert stats["loss"] < start["loss"]
    test = evaluate(trained, digits.x_test, digits.y_test, batch_size=100, **ARCH)
    assert set(test) == {"loss", "accuracy", "num_samples"}
    assert test["num_samples"] == len(digits.y_test)
    assert test["accuracy"] > 0.85  # chance is 0.1
    # Batching must not change the result beyond float summation order.
    whole = evaluate(trained, digits.x_test, digits.y_test, batch_size=10_000, **ARCH)
    assert whole["accuracy"] == test["accuracy"]
    assert whole["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_max_batches_one_is_a_single_sgd_step(digits, params) -> None:
    x, y = digits.x_train[:64], digits.y_train[:64]
    lr = 0.1
    # Full batch, so the single step is independent of the shuffle.
    one, stats = train_local(params, x, y, epochs=5, batch_size=64, lr=lr, max_batches=1, **ARCH)
    model = build_mlp(64, HIDDEN, 10)
    model.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    torch.nn.functional.cross_entropy(model(torch.tensor(x)), torch.tensor(y)).backward()
    for name, p in model.named_parameters():
        expected = params[name] - lr * p.grad.numpy()
        np.testing.assert_allclose(one[name], expected, rtol=1e-5, atol=1e-6)
    # Small batches: max_batches caps the total count across epochs.
    a, _ = train_local(params, x, y, epochs=3, batch_size=8, lr=lr, max_batches=1, seed=1, **ARCH)
    b, _ = train_local(params, x, y, epochs=1, batch_size=8, lr=lr, max_batches=1, seed=1, **ARCH)
    c, _ = train_local(params, x, y, epochs=1, batch_size=8, lr=lr, max_batches=2, seed=1, **ARCH)
    assert digest(a) == digest(b) != digest(c)


def test_proximal_term_keeps_weights_near_global(digits, params) -> None:
    x, y = digits.x_train[:500], digits.y_train[:500]
    kwargs = dict(epochs=3, batch_size=32, lr=0.05, **ARCH)
    free, _ = train_local(params, x, y, **kwargs)
    # lr * mu = 1: as strong a pull as plain SGD allows without oscillating (needs lr * mu < 2).
    prox, _ = train_local(params, x, y, proximal_mu=20.0, **kwargs)

    def drift(p: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(((p[k] - params[k]) ** 2).sum() for k in params)))

    assert drift(free) > 0
    assert drift(prox) < 0.1 * drift(free)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p.pop("4.bias"), "missing"),
        (lambda p: p.update(extra=np.zeros(3, np.float32)), "unexpected"),
        (lambda p: p.update({"0.weight": np.zeros((32, 65), np.float32)}), "shape"),
    ],
)
def test_train_local_rejects_mismatched_parameters(digits, params, mutate, match) -> None:
    mutate(params)
    with pytest.raises(ValueError, match=match):
        train_local(params, digits.x_train[:10], digits.y_train[:10], epochs=1, batch_size=4, lr=0.1, **ARCH)
    with pytest.raises(ValueError, match=match):
        evaluate(params, digits.x_test, digits.y_test, **ARCH)


def test_train_local_rejects_wrong_architecture_and_inputs(digits, params) -> None:
    x, y = digits.x_train[:10], digits.y_train[:10]
    with pytest.raises(ValueError, match="do not match"):
        train_local(params, x, y, hidden=(64,), num_classes=10, epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="do not match"):
        train_local(params, x[:, :32], y, epochs=1, batch_size=4, lr=0.1, **ARCH)
    with pytest.raises(ValueError, match="labels"):
        train_local(params, x, y + 10, epochs=1, batch_size=4, lr=0.1, **ARCH)
    with pytest.raises(ValueError, match="shape"):
        train_local(params, x, y[:5], epochs=1, batch_size=4, lr=0.1, **ARCH)
    with pytest.raises(ValueError, match="max_batches"):
        train_local(params, x, y, epochs=1, batch_size=4, lr=0.1, max_batches=0, **ARCH)


@pytest.mark.parametrize("steps", [1, 3])
def test_plain_sgd_on_the_shared_model_is_bitwise_the_optimizers_step(digits, params, steps) -> None:
    """Plain SGD trains without copying the model first (the first step writes into the
    gradients' memory, torch_app.sgd's `borrowed`): bitwise what SGD on a copy gives, and
    the read-only inputs are neither written nor returned."""
    from brokerfl.app.torch_adapter import sgd
    from brokerfl.handlers.trainer import _load_model

    x, y = digits.x_train[:64], digits.y_train[:64]
    shared = read_only(params)
    before = digest(shared)
    got, _ = train_local(shared, x, y, epochs=2, batch_size=16, lr=0.05, max_batches=steps, seed=4, **ARCH)
    model = _load_model(params, 64, HIDDEN, 10)  # a copy, stepped by torch.optim.SGD itself
    sgd(
        model,
        (torch.tensor(x, dtype=torch.float32), torch.tensor(y)),
        epochs=2,
        batch_size=16,
        lr=0.05,
        max_batches=steps,
        seed=4,
    )
    expected = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert digest(got) == digest(expected)
    assert digest(shared) == before
    for name, array in got.items():
        assert array.flags.writeable and not np.shares_memory(array, params[name])
    with pytest.raises(ValueError, match="plain SGD"):
        sgd(
            model,
            (torch.tensor(x, dtype=torch.float32), torch.tensor(y)),
            epochs=1,
            batch_size=16,
            lr=0.05,
            momentum=0.9,
            borrowed=True,
        )

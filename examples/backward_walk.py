"""A walk through the backward pass of batch normalization and softmax cross-entropy.

For a tiny batch (4 examples, 3 features or classes, float64), the script
builds each computational graph step by step, forward and then backward by
hand with the chain rule, and prints every intermediate gradient beside
`tf.GradientTape`'s gradient of the same steps.

Batch normalization, per feature over the N examples of the batch:

    mu    = sum_i x_i / N                  dmu    = -sum_i dxc_i
    xc    = x - mu                         dxc    = dxhat * inv + dvar * 2 xc / N
    var   = sum_i xc_i^2 / N               dvar   = -dinv * inv^3 / 2
    inv   = 1 / sqrt(var + epsilon)        dinv   = sum_i dxhat_i * xc_i
    xhat  = xc * inv                       dxhat  = dy * gamma
    y     = gamma * xhat + beta            dgamma = sum_i dy_i * xhat_i,
                                           dbeta  = sum_i dy_i
                                           dx     = dxc + dmu / N

The walk then shows that the folded closed form `keras_bn.ops.batch_norm_train`
uses, `dx = a * dy + b * xc + c` with per-feature coefficients
`a = gamma * inv`, `b = -gamma * inv^3 * sum(dy * xc) / N`,
`c = -gamma * inv * sum(dy) / N`, gives the same `dx`, `dgamma` and `dbeta`.

Softmax cross-entropy, per example over the classes, for labels `y` that sum
to one: `m = max(z)`, `e = exp(z - m)`, `s = sum(e)`, `p = e / s`,
`loss = -sum(y * log p)`, whose gradient collapses to `dz = p - y`, the
gradient `keras_bn.ops.softmax_cross_entropy` returns.

It prints a verdict (every gradient agrees, or which do not), writes a CSV
of every check and a figure of both graphs, and with --markdown writes the
walk as a Markdown page.
"""

import shutil

import _common


def parse_args(argv=None):
    # The walk takes seconds whole: --quick changes only the output folder.
    parser = _common.ExampleParser(
        "backward_walk", __doc__, data=False, quick_is_full_run=True
    )
    parser.add_argument(
        "--markdown",
        type=_common.pathlib.Path,
        help="also write the walk as a Markdown page to this file, with the "
        "figure beside it (the same name, .png)",
    )
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402

BATCH, FEATURES = 4, 3
EPSILON = 1e-3
# float64 rounding over a few operations on values of order 1: a gradient
# agrees if it is within this many units of max(1, |reference|).
FLOAT64_TOLERANCE = 1e-12
# keras_bn's default path in float32 (fused kernels where they apply), against
# the float64 walk: float32 rounding, with room for a few dozen operations.
FLOAT32_TOLERANCE = 1e-5
TAPE = "tf.GradientTape on the same steps"


class Walk:
    """Collects the walk's lines, prints them, and keeps the checks."""

    def __init__(self):
        self.blocks = []  # ("heading" | "text" | "code", text)
        self.checks = []

    def heading(self, text):
        self.blocks.append(("heading", text))
        print(f"\n== {text} ==")

    def text(self, text):
        self.blocks.append(("text", text))
        print(text)

    def show(self, label, value):
        lines = f"{label} =\n{_format(value)}"
        self.blocks.append(("code", lines))
        print(lines)

    def check(self, graph, name, formula, by_hand, reference, against, tolerance):
        """Compares `by_hand` with `reference`; records and prints the result."""
        by_hand, reference = np.asarray(by_hand), np.asarray(reference)
        difference = float(np.max(np.abs(by_hand - reference)))
        scale = max(1.0, float(np.max(np.abs(reference))))
        agrees = difference <= tolerance * scale
        self.checks.append(
            {
                "graph": graph,
                "gradient": name,
                "formula": formula,
                "against": against,
                "max_abs_difference": difference,
                "tolerance": tolerance * scale,
                "agrees": agrees,
            }
        )
        mark = "agrees" if agrees else "DIFFERS"
        lines = (
            f"{name} = {formula}\n{_format(by_hand)}\n"
            f"  {against}: max |difference| {difference:.1e} -> {mark}"
        )
        self.blocks.append(("code", lines))
        print(lines)

    def markdown(self, title, preface):
        """The walk as a Markdown page; consecutive arrays share a code block."""
        parts = [f"# {title}\n", f"{preface}\n"]
        for kind, text in self.blocks:
            if kind == "code" and parts[-1].startswith("```"):
                parts[-1] = parts[-1].removesuffix("```\n") + f"\n{text}\n```\n"
            elif kind == "code":
                parts.append(f"```\n{text}\n```\n")
            elif kind == "heading":
                parts.append(f"## {text}\n")
            else:
                parts.append(f"{text}\n")
        return "\n".join(parts)


def _format(value):
    def number(v):
        v = v + 0.0  # no "-0.000000"
        return f"{v: .6f}" if v == 0 or abs(v) >= 1e-6 else f"{v: .1e}"

    return np.array2string(np.asarray(value), formatter={"float_kind": number})


def batch_norm_walk(walk, rng):
    """The BN graph, forward, by hand backward, checked; returns node results."""
    x = rng.normal(2.0, 3.0, (BATCH, FEATURES))
    gamma = rng.uniform(0.5, 2.0, FEATURES)
    beta = rng.normal(0.0, 1.0, FEATURES)
    dy = rng.normal(0.0, 1.0, (BATCH, FEATURES))  # the upstream gradient dL/dy
    n = BATCH

    walk.heading("Batch normalization: the forward pass")
    walk.text(
        f"A batch of N = {n} examples with {FEATURES} features (float64), "
        f"epsilon = {EPSILON:g}. The loss is L = sum(dy * y) for a fixed "
        "random dy, so that dL/dy = dy: any upstream gradient would do."
    )
    walk.show("x", x)
    walk.show("gamma", gamma)
    walk.show("beta", beta)
    mu = x.mean(axis=0)
    xc = x - mu
    var = (xc**2).mean(axis=0)
    inv = 1.0 / np.sqrt(var + EPSILON)
    xhat = xc * inv
    y = gamma * xhat + beta
    for label, value in (
        ("1. mu = sum_i x_i / N", mu),
        ("2. xc = x - mu", xc),
        ("3. var = sum_i xc_i^2 / N", var),
        ("4. inv = 1 / sqrt(var + epsilon)", inv),
        ("5. xhat = xc * inv", xhat),
        ("6. y = gamma * xhat + beta", y),
    ):
        walk.show(label, value)
    walk.show("dy = dL/dy (upstream)", dy)

    # The same six steps on a tape; gradients of L with respect to every node.
    tensors = {k: tf.constant(v) for k, v in (("x", x), ("gamma", gamma))}
    tensors["beta"] = tf.constant(beta)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(list(tensors.values()))
        t = dict(tensors)
        t["mu"] = tf.reduce_mean(t["x"], axis=0)
        t["xc"] = t["x"] - t["mu"]
        t["var"] = tf.reduce_mean(tf.square(t["xc"]), axis=0)
        t["inv"] = tf.math.rsqrt(t["var"] + EPSILON)
        t["xhat"] = t["xc"] * t["inv"]
        t["y"] = t["gamma"] * t["xhat"] + t["beta"]
        loss = tf.reduce_sum(tf.constant(dy) * t["y"])
    tape_grads = {k: tape.gradient(loss, v).numpy() for k, v in t.items()}

    walk.heading("Batch normalization: the backward pass by hand")
    walk.text(
        "From the last step back to x. Each gradient is dL/d(node), the sum "
        "over every path from that node to L; each is checked against "
        "tf.GradientTape's gradient of L with respect to the same node."
    )

    def check(name, formula, value, node):
        walk.check(
            "batch norm",
            name,
            formula,
            value,
            tape_grads[node],
            TAPE,
            FLOAT64_TOLERANCE,
        )

    dxhat = dy * gamma
    check("6. dbeta", "sum_i dy_i", dy.sum(axis=0), "beta")
    check("6. dgamma", "sum_i dy_i * xhat_i", (dy * xhat).sum(axis=0), "gamma")
    check("6. dxhat", "dy * gamma", dxhat, "xhat")
    dinv = (dxhat * xc).sum(axis=0)
    check("5. dinv", "sum_i dxhat_i * xc_i", dinv, "inv")
    dvar = -0.5 * dinv * inv**3
    check("4. dvar", "-dinv * inv^3 / 2", dvar, "var")
    dxc_through_xhat = dxhat * inv
    dxc_through_var = dvar * 2.0 * xc / n
    walk.show("5. dxc, the path through xhat: dxhat * inv", dxc_through_xhat)
    walk.show("3. dxc, the path through var: dvar * 2 * xc / N", dxc_through_var)
    dxc = dxc_through_xhat + dxc_through_var
    check("2. dxc", "the sum of both paths", dxc, "xc")
    dmu = -dxc.sum(axis=0)
    check("2. dmu", "-sum_i dxc_i", dmu, "mu")
    dx = dxc + dmu / n
    check("1. dx", "dxc + dmu / N (the paths through xc and mu)", dx, "x")

    walk.heading("Batch normalization: the folded closed form keras_bn uses")
    s1, s2 = dy.sum(axis=0), (dy * xc).sum(axis=0)
    a = gamma * inv
    b = -gamma * inv**3 * s2 / n
    c = -gamma * inv * s1 / n
    walk.text(
        "Substituting the steps into one another, every term of dx is a "
        "per-feature coefficient times dy, xc or 1. With S1 = sum_i dy_i and "
        "S2 = sum_i dy_i * xc_i: dx = a * dy + b * xc + c, a = gamma * inv, "
        "b = -gamma * inv^3 * S2 / N, c = -gamma * inv * S1 / N; "
        "dgamma = inv * S2, dbeta = S1. Per feature:"
    )
    walk.show("a", a)
    walk.show("b", b)
    walk.show("c", c)
    folded = a * dy + b * xc + c
    walk.check(
        "batch norm",
        "folded dx",
        "a * dy + b * xc + c",
        folded,
        dx,
        "the step-by-step dx",
        FLOAT64_TOLERANCE,
    )

    walk.text(
        "keras_bn.ops.batch_norm_train(x, gamma, beta, fused=False) computes "
        "this closed form in its tf.custom_gradient backward pass:"
    )
    op_grads = _batch_norm_op_gradients(x, gamma, beta, dy, fused=False)
    for name, hand in (("dx", dx), ("dgamma", inv * s2), ("dbeta", s1)):
        walk.check(
            "batch norm",
            f"keras_bn {name}",
            "batch_norm_train, fused=False, float64",
            op_grads[name],
            hand,
            "the step-by-step walk",
            FLOAT64_TOLERANCE,
        )
    walk.text(
        "In float32, batch_norm_train's default (fused=None) runs TensorFlow's "
        "fused kernels for this input; its gradients agree with the float64 "
        "walk to float32 rounding:"
    )
    op_grads = _batch_norm_op_gradients(x, gamma, beta, dy, fused=None, dtype="float32")
    for name, hand in (("dx", dx), ("dgamma", inv * s2), ("dbeta", s1)):
        walk.check(
            "batch norm",
            f"keras_bn {name}, float32",
            "batch_norm_train, fused=None, float32",
            op_grads[name],
            hand,
            "the step-by-step walk",
            FLOAT32_TOLERANCE,
        )


def _batch_norm_op_gradients(x, gamma, beta, dy, fused, dtype="float64"):
    x, gamma, beta, dy = (tf.constant(v, dtype) for v in (x, gamma, beta, dy))
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y, _, _ = keras_bn.ops.batch_norm_train(
            x, gamma, beta, epsilon=EPSILON, fused=fused
        )
        loss = tf.reduce_sum(dy * y)
    dx, dgamma, dbeta = tape.gradient(loss, [x, gamma, beta])
    return {"dx": dx.numpy(), "dgamma": dgamma.numpy(), "dbeta": dbeta.numpy()}


def cross_entropy_walk(walk, rng):
    """The softmax cross-entropy graph, forward, by hand backward, checked."""
    z = rng.normal(0.0, 2.0, (BATCH, FEATURES))
    y = np.eye(FEATURES)[rng.integers(0, FEATURES, BATCH)]

    walk.heading("Softmax cross-entropy: the forward pass")
    walk.text(
        f"Logits z for {BATCH} examples and {FEATURES} classes (float64), "
        "one-hot labels y. The loss is the sum of the per-example losses, "
        "L = sum_i loss_i (a mean over the batch divides every gradient by "
        "the batch size)."
    )
    walk.show("z", z)
    walk.show("y", y)
    m = z.max(axis=1, keepdims=True)
    zs = z - m
    e = np.exp(zs)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    logp = np.log(p)
    loss = -(y * logp).sum(axis=1)
    for label, value in (
        ("1. m = max_c z_c (a shift that keeps exp from overflowing)", m),
        ("2. zs = z - m", zs),
        ("3. e = exp(zs)", e),
        ("4. s = sum_c e_c", s),
        ("5. p = e / s (the softmax)", p),
        ("6. logp = log(p)", logp),
        ("7. loss = -sum_c y_c * logp_c", loss),
    ):
        walk.show(label, value)

    tensors = {"z": tf.constant(z)}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tensors["z"])
        t = dict(tensors)
        t["m"] = tf.reduce_max(t["z"], axis=1, keepdims=True)
        t["zs"] = t["z"] - t["m"]
        t["e"] = tf.exp(t["zs"])
        t["s"] = tf.reduce_sum(t["e"], axis=1, keepdims=True)
        t["p"] = t["e"] / t["s"]
        t["logp"] = tf.math.log(t["p"])
        t["loss"] = -tf.reduce_sum(tf.constant(y) * t["logp"], axis=1)
        total = tf.reduce_sum(t["loss"])
    tape_grads = {k: tape.gradient(total, v).numpy() for k, v in t.items()}

    walk.heading("Softmax cross-entropy: the backward pass by hand")

    def check(name, formula, value, node):
        walk.check(
            "cross-entropy",
            name,
            formula,
            value,
            tape_grads[node],
            TAPE,
            FLOAT64_TOLERANCE,
        )

    dlogp = -y
    check("7. dlogp", "-y", dlogp, "logp")
    dp = dlogp / p
    check("6. dp", "dlogp / p = -y / p", dp, "p")
    ds = -(dp * e).sum(axis=1, keepdims=True) / s**2
    check("5. ds", "-sum_c dp_c * e_c / s^2", ds, "s")
    de = dp / s + ds
    check("4. de", "dp / s + ds (the paths through p and s)", de, "e")
    dzs = de * e
    check("3. dzs", "de * e", dzs, "zs")
    dm = -dzs.sum(axis=1, keepdims=True)
    check("2. dm", "-sum_c dzs_c (zero: L does not depend on the shift)", dm, "m")
    check("2. dz", "dzs (through zs; m carries no gradient)", dzs, "z")

    walk.heading("Softmax cross-entropy: down to softmax - y")
    walk.text(
        "Substituting: dzs_c = (-y_c / (p_c s) + ds) * e_c = -y_c + ds * e_c, "
        "and ds = sum_c y_c / (p_c s) * e_c / s = sum_c y_c / s = 1 / s when "
        "the labels sum to one, so dz = e / s - y = p - y. The same through "
        "the softmax Jacobian: dp/dz = diag(p) - p p^T, and (diag(p) - p "
        "p^T) (-y / p) = -y + p * sum(y) = p - y."
    )
    walk.check(
        "cross-entropy",
        "dz closed form",
        "p - y",
        p - y,
        dzs,
        "the step-by-step dz",
        FLOAT64_TOLERANCE,
    )
    jacobian_product = np.stack(
        [(np.diag(pi) - np.outer(pi, pi)) @ dpi for pi, dpi in zip(p, dp)]
    )
    walk.check(
        "cross-entropy",
        "dz by the Jacobian",
        "(diag(p) - p p^T) dp",
        jacobian_product,
        dzs,
        "the step-by-step dz",
        FLOAT64_TOLERANCE,
    )
    walk.text(
        "keras_bn.ops.softmax_cross_entropy(y, z) returns the per-example loss "
        "and, in its tf.custom_gradient backward pass, p - y:"
    )
    logits = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        op_loss = keras_bn.ops.softmax_cross_entropy(tf.constant(y), logits)
        op_total = tf.reduce_sum(op_loss)
    walk.check(
        "cross-entropy",
        "keras_bn loss",
        "softmax_cross_entropy(y, z)",
        op_loss.numpy(),
        loss,
        "the step-by-step loss",
        FLOAT64_TOLERANCE,
    )
    walk.check(
        "cross-entropy",
        "keras_bn dz",
        "gradient of sum(softmax_cross_entropy(y, z))",
        tape.gradient(op_total, logits).numpy(),
        dzs,
        "the step-by-step dz",
        FLOAT64_TOLERANCE,
    )


# Node positions (column, row) and edges of the two graphs in the figure.
BN_GRAPH = {
    "nodes": {
        "x": (0, 1),
        "mu": (1, 0),
        "xc": (2, 1),
        "var": (3, 0),
        "inv": (4, 0),
        "xhat": (5, 1),
        "gamma": (5, 2),
        "beta": (6, 2),
        "y": (6, 1),
    },
    "edges": [
        ("x", "mu"),
        ("x", "xc"),
        ("mu", "xc"),
        ("xc", "var"),
        ("var", "inv"),
        ("xc", "xhat"),
        ("inv", "xhat"),
        ("xhat", "y"),
        ("gamma", "y"),
        ("beta", "y"),
    ],
    "closed_form": "folded closed form; keras_bn.ops.batch_norm_train's dx, "
    "dgamma, dbeta (float64, and float32 fused)",
    "labels": {
        "mu": "mu = mean(x)",
        "xc": "xc = x - mu",
        "var": "var = mean(xc^2)",
        "inv": "inv = 1 / sqrt(var + eps)",
        "xhat": "xhat = xc * inv",
        "y": "y = gamma * xhat + beta",
    },
    "checks": {
        "x": "1. dx",
        "mu": "2. dmu",
        "xc": "2. dxc",
        "var": "4. dvar",
        "inv": "5. dinv",
        "xhat": "6. dxhat",
        "gamma": "6. dgamma",
        "beta": "6. dbeta",
    },
}
CE_GRAPH = {
    "nodes": {
        "z": (0, 1),
        "m": (1, 0),
        "zs": (2, 1),
        "e": (3, 1),
        "s": (4, 0),
        "p": (5, 1),
        "logp": (6, 1),
        "y": (6, 2),
        "loss": (7, 1),
    },
    "edges": [
        ("z", "m"),
        ("z", "zs"),
        ("m", "zs"),
        ("zs", "e"),
        ("e", "s"),
        ("e", "p"),
        ("s", "p"),
        ("p", "logp"),
        ("logp", "loss"),
        ("y", "loss"),
    ],
    "closed_form": "dz = p - y, by the Jacobian, and "
    "keras_bn.ops.softmax_cross_entropy's loss and dz",
    "labels": {
        "m": "m = max(z)",
        "zs": "zs = z - m",
        "e": "e = exp(zs)",
        "s": "s = sum(e)",
        "p": "p = e / s",
        "logp": "logp = log(p)",
        "loss": "loss = -sum(y * logp)",
    },
    "checks": {
        "z": "2. dz",
        "m": "2. dm",
        "zs": "3. dzs",
        "e": "4. de",
        "s": "5. ds",
        "p": "6. dp",
        "logp": "7. dlogp",
    },
}


def plot(checks, path):
    figure, axes = plt.subplots(2, 1, figsize=(15, 7.5), layout="constrained")
    by_name = {(row["graph"], row["gradient"]): row for row in checks}
    for ax, graph, spec, title in (
        (axes[0], "batch norm", BN_GRAPH, "(a) batch normalization"),
        (axes[1], "cross-entropy", CE_GRAPH, "(b) softmax cross-entropy"),
    ):
        _draw_graph(
            ax, spec, {k: by_name[(graph, v)] for k, v in spec["checks"].items()}
        )
        closed_forms = [
            row for row in checks if row["graph"] == graph and row["against"] != TAPE
        ]
        agree = all(row["agrees"] for row in closed_forms)
        largest = max(row["max_abs_difference"] for row in closed_forms)
        ax.text(
            0.0,
            0.0,
            f"{spec['closed_form']}: {'all agree' if agree else 'NOT all agree'} "
            f"with the walk (largest |diff| {largest:.0e})",
            transform=ax.transAxes,
            fontsize=10,
            color=_common.COLORS[0],
        )
        ax.set_title(
            f"{title}: forward arrows; under each node, dL/d(node) by hand vs "
            "tf.GradientTape"
        )
    return _common.save_figure(figure, path)


def _draw_graph(ax, spec, checks):
    nodes = spec["nodes"]
    boxes = {}
    for name, (column, row) in nodes.items():
        boxes[name] = ax.text(
            column,
            -row,
            spec["labels"].get(name, name),
            ha="center",
            va="center",
            fontsize=10,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="black"),
        )
        if name in checks:
            result = checks[name]
            verdict = "agrees" if result["agrees"] else "DIFFERS"
            ax.text(
                column,
                -row - 0.3,
                f"d{name}: {verdict}\n|diff| {result['max_abs_difference']:.0e}",
                ha="center",
                va="top",
                fontsize=8,
                color=_common.COLORS[0],
            )
    for start, end in spec["edges"]:
        (x0, y0), (x1, y1) = nodes[start], nodes[end]
        ax.annotate(
            "",
            xy=(x1, -y1),
            xytext=(x0, -y0),
            arrowprops=dict(
                arrowstyle="->",
                color="gray",
                patchA=boxes[start].get_bbox_patch(),
                patchB=boxes[end].get_bbox_patch(),
                shrinkA=3,
                shrinkB=3,
            ),
        )
    columns = [column for column, _ in nodes.values()]
    ax.set(xlim=(min(columns) - 0.6, max(columns) + 0.6), ylim=(-2.9, 0.4))
    ax.axis("off")


def report(checks):
    """The verdict, computed from the checks."""
    failed = [row for row in checks if not row["agrees"]]
    if failed:
        names = ", ".join(f"{row['graph']} {row['gradient']}" for row in failed)
        return f"{len(failed)} of {len(checks)} gradients DIFFER: {names}."
    worst = max(checks, key=lambda row: row["max_abs_difference"] / row["tolerance"])
    return (
        f"All {len(checks)} checks agree: every hand-written gradient matches "
        "tf.GradientTape on the same steps, and keras_bn's folded closed forms "
        "give the same dx, dgamma, dbeta and dz = p - y (closest to its "
        f"tolerance: {worst['gradient']}, {worst['max_abs_difference']:.1e} "
        f"against {worst['tolerance']:.0e})."
    )


def main(args):
    if args.quick:
        print(f"quick run: the same run as a full one; outputs go to {args.out}.")
    _common.start_run(args)
    rng = np.random.default_rng(args.seed)
    walk = Walk()
    batch_norm_walk(walk, rng)
    cross_entropy_walk(walk, rng)
    verdict = report(walk.checks)
    _common.write_csv(args.out / "backward_walk.csv", walk.checks)
    figure = plot(walk.checks, args.out / "backward_walk.png")
    if args.markdown:
        # The page shows the figure from beside it.
        page_figure = args.markdown.with_suffix(".png")
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        if page_figure.resolve() != figure.resolve():
            shutil.copyfile(figure, page_figure)
        preface = (
            "Written by `python examples/backward_walk.py --markdown "
            f"{args.markdown}` (seed {args.seed}), which builds the two graphs "
            "step by step, differentiates them by hand, and checks every "
            "gradient against `tf.GradientTape` and keras_bn's ops. "
            f"{verdict}\n\n![The two graphs and their checks]({page_figure.name})"
        )
        page = walk.markdown("A walk through the backward pass", preface)
        args.markdown.write_text(page)
        print(f"Markdown page: {args.markdown}")
    with _common.verdicts(args):
        print(f"\n{verdict}")
    _common.print_wall_time(args)
    if not all(row["agrees"] for row in walk.checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main(ARGS)

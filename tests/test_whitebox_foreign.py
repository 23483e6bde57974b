"""A mark made by another Uchida implementation (its own X, N x T layout, its own
names), trained on real data in torch, exported, renamed, and audited through
`wmaudit key import` + `wmaudit extract` from the ONNX file alone."""
import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from auditor.cli import main  # noqa: E402
from auditor.data.datasets import fashion_mnist, fashion_mnist_normalized  # noqa: E402
from auditor.marks.keys import load_key  # noqa: E402
from auditor.marks.whitebox import extract  # noqa: E402

T = 128


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Train with a mark on conv2 (mean over output channels) using a torch-generated X."""
    d = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    X_nt = torch.randn(32 * 9, T, generator=g)            # this implementation stores N x T
    bits = torch.randint(0, 2, (T,), generator=g).float()
    x_u8, y = fashion_mnist("train")
    x = torch.from_numpy(fashion_mnist_normalized(x_u8[:2048]))
    y = torch.from_numpy(y[:2048])
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for step in range(300):
        i = torch.randint(0, 2048, (64,), generator=g)
        w = net.conv2.weight.mean(0).reshape(-1)
        reg = nn.functional.binary_cross_entropy_with_logits(w @ X_nt, bits)
        loss = nn.functional.cross_entropy(net(x[i]), y[i]) + 3.0 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    np.save(d / "X_nt.npy", X_nt.numpy())
    np.save(d / "bits.npy", bits.numpy().astype(np.uint8))
    # BN kept, then every initializer renamed to an anonymous name
    path = d / "model.onnx"
    torch.onnx.export(net, (x[:1],), str(path), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      input_names=["x"], output_names=["y"])
    m = onnx.load(str(path))
    ren = {t.name: f"t{i}" for i, t in enumerate(m.graph.initializer)}
    for t in m.graph.initializer:
        t.name = ren[t.name]
    for n in m.graph.node:
        n.input[:] = [ren.get(s, s) for s in n.input]
    onnx.save(m, str(path))
    # the same model as deployment tools leave it: BN folded into the conv (dynamo default export)
    folded = d / "folded.onnx"
    torch.onnx.export(net, (x[:1],), str(folded), dynamo=True, external_data=False)
    wt = net.conv2.weight.detach().numpy().copy()
    with torch.no_grad():
        pre = (torch.from_numpy(X_nt.numpy().T) @ net.conv2.weight.mean(0).reshape(-1) > 0).float()
    assert int((pre == bits).sum()) == T  # embedded in torch
    bn = {"gamma": net.bn2.weight.tolist(), "beta": net.bn2.bias.tolist(),
          "running_mean": net.bn2.running_mean.tolist(), "running_var": net.bn2.running_var.tolist(),
          "eps": net.bn2.eps}
    ref = d / "reference.onnx"
    torch.onnx.export(net, (x[:1],), str(ref), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    return d, wt, bn


def _import(d, out, *extra):
    rc = main(["key", "import", "--matrix", str(d / "X_nt.npy"), "--transposed", "--bits", str(d / "bits.npy"),
               "--param", "conv2.weight", "--shape", "32,32,3,3", "--reduce", "mean", "-o", str(out), *extra])
    assert rc == 0


def test_foreign_mark_found_under_anonymous_names(foreign, capsys):
    d, wt, _ = foreign
    _import(d, d / "key.json")
    capsys.readouterr()
    rc = main(["extract", str(d / "model.onnx"), "--key", str(d / "key.json"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    m = doc["result"]["marks"][0]
    assert rc == 0 and doc["result"]["verdict"] == "detected"
    assert m["ber"] == 0.0 and m["matches"] == T
    assert m["location"]["how"] == "shape-search"
    # conv1 (32,1,3,3) does not fit; conv2 and its transposed twin... only conv2 has the shape
    assert m["p_corrected"] < 1e-30
    assert m["margin_min"] > 0


def test_wrong_key_not_detected(foreign, tmp_path):
    d, _, _ = foreign
    rng = np.random.default_rng(99)
    np.save(tmp_path / "X.npy", rng.standard_normal((T, 288)))
    np.save(tmp_path / "bits.npy", rng.integers(0, 2, T).astype(np.uint8))
    assert main(["key", "import", "--matrix", str(tmp_path / "X.npy"), "--bits", str(tmp_path / "bits.npy"),
                 "--param", "conv2.weight", "--shape", "32,32,3,3", "--reduce", "mean",
                 "-o", str(tmp_path / "k.json")]) == 0
    res = extract(d / "model.onnx", load_key(tmp_path / "k.json"))
    m = res.marks[0]
    assert res.verdict == "not detected" and res.exit_code == 1
    assert 0.35 < m.ber < 0.65 and m.p_corrected > 1e-3


def test_bn_folded_recovered_with_anchors(foreign, tmp_path):
    d, wt, bn = foreign
    _import(d, tmp_path / "key.json")
    key = load_key(tmp_path / "key.json")
    # without anchors: the graph shows the folding, reported with what to give
    plain = extract(d / "folded.onnx", key).marks[0]
    assert plain.batchnorm["status"] == "probably-folded" and plain.batchnorm["evidence"]
    assert "--reference" in plain.batchnorm["detail"] and "--anchors-from" in plain.batchnorm["detail"]
    key.whitebox[0].batchnorm = bn
    res = extract(d / "folded.onnx", key)
    m = res.marks[0]
    assert m.batchnorm["status"] == "folded"
    assert res.verdict == "detected" and m.ber == 0.0 and m.p_value < 1e-30


def test_bn_folded_recovered_with_reference(foreign, tmp_path):
    d, _, _ = foreign
    _import(d, tmp_path / "key.json")
    res = extract(d / "folded.onnx", load_key(tmp_path / "key.json"), reference=d / "reference.onnx")
    m = res.marks[0]
    assert m.batchnorm["status"] == "folded" and "reference" in m.batchnorm["detail"]
    assert m.ber == 0.0 and res.verdict == "detected"


def test_kept_batchnorm_reported(foreign, tmp_path):
    d, _, bn = foreign
    _import(d, tmp_path / "key.json")
    key = load_key(tmp_path / "key.json")
    key.whitebox[0].batchnorm = bn
    m = extract(d / "model.onnx", key).marks[0]
    assert m.batchnorm["status"] == "kept" and m.ber == 0.0

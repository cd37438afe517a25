"""CAMs and occlusion on real trained models from ../shared: do they point at the object?

Check used: the maximum of the Grad-CAM heat map (and the centre of the occlusion patch
that lowers the predicted class's probability most) lies inside a hand-annotated
bounding box of the animal. Boxes were drawn by looking at the centre crops the models
see (short side resized, centre square crop, as in the model configs) and are given as
fractions (top, left, bottom, right) of that crop, so they hold for 224, 192 and 32 pixel
inputs alike:
- skimage_chelsea_cat.png: the cat's head fills the crop except a background strip on
  the right and the very top: (0.10, 0.00, 1.00, 0.92).
- winml_dog_golden_retriever.jpg: the sitting puppy, head to paws: (0.05, 0.12, 1.00, 0.70).

Sanity check (Adebayo et al. 2018, cascading randomization from the top): randomizing the
classifier (Gemm) and the last residual block's two convolutions of ResNet-20 must change
the Grad-CAM map: Spearman rank correlation of the heat maps < 0.5 (measured: -0.21 and
0.28; saliency 0.21 and 0.27). Randomizing the Gemm alone is not enough on this model
(rho 0.81 / 0.82): Grad-CAM of a GAP + linear head only reweights the same activation maps,
which stay spatially correlated whatever the weights.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import SHARED_IMAGES, SHARED_MODELS, requires_shared

pytestmark = requires_shared

CAT, DOG = "skimage_chelsea_cat.png", "winml_dog_golden_retriever.jpg"
BOXES = {CAT: (0.10, 0.00, 1.00, 0.92), DOG: (0.05, 0.12, 1.00, 0.70)}
# expected top-1 label names (the repository's labels files, see conftest)
EXPECTED = {"squeezenet": {CAT: "cat", DOG: "golden retriever"},
            "mobilenet": {CAT: "cat", DOG: "golden retriever"},
            "resnet20": {CAT: "cat", DOG: "dog"}}


def _inside(point, hw, box) -> bool:
    y, x = point
    top, left, bottom, right = box
    return top * hw[0] <= y <= bottom * hw[0] and left * hw[1] <= x <= right * hw[1]


def _images():
    return [str(SHARED_IMAGES / CAT), str(SHARED_IMAGES / DOG)]


@pytest.mark.parametrize("name", ["squeezenet", "mobilenet", "resnet20"])
def test_gradcam_peaks_on_the_animal(client, name):
    cam = client.grad_cam(name, _images())
    hw = cam.heatmap.shape[1:]
    for i, image in enumerate((CAT, DOG)):
        assert EXPECTED[name][image] in cam.labels[i], (name, image, cam.labels[i])
        assert _inside(cam.peak(i), hw, BOXES[image]), (name, image, cam.peak(i), hw)
        assert cam.heatmap[i].max() == pytest.approx(1.0) and cam.heatmap[i].min() == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["squeezenet", "resnet20"])
def test_occlusion_hurts_most_on_the_animal(client, name):
    occ = client.occlusion(name, _images())
    hw = occ.input.shape[2:]
    for i, image in enumerate((CAT, DOG)):
        assert EXPECTED[name][image] in occ.labels[i]
        top, left, bottom, right = occ.most_sensitive(i)
        centre = ((top + bottom) / 2, (left + right) / 2)
        assert _inside(centre, hw, BOXES[image]), (name, image, centre, hw)
        assert occ.probability[i].min() < occ.probability_unoccluded[i]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(v):
        v = v.ravel()
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        # average ranks over ties
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_cam_sanity_randomized_classifier(client):
    """Adebayo et al.: a map that ignores the classifier's weights fails this test."""
    model = onnx.load(str(SHARED_MODELS / "cifar10" / "resnet20.onnx"))
    rng = np.random.default_rng(0)
    last_convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv"][-2:]
    randomize = {"linear.weight", *last_convs}
    for t in model.graph.initializer:
        if t.name in randomize:
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(rng.normal(0, w.std(), w.shape).astype(np.float32), t.name))
    randomized = client.load_model(model.SerializeToString(), "resnet20_random_head", config={"preset": "imagenet"})
    images = _images()
    trained = client.grad_cam("resnet20", images)
    target = trained.target_index.tolist()
    rand = client.grad_cam(randomized, images, target)
    assert rand.layer == trained.layer
    for i in range(len(images)):
        rho = _spearman(trained.heatmap[i], rand.heatmap[i])
        assert rho < 0.5, rho
    # the saliency map (input gradient) too
    g0 = np.abs(client.gradient("resnet20", images, target).gradient).max(axis=1)
    g1 = np.abs(client.gradient(randomized, images, target).gradient).max(axis=1)
    assert all(_spearman(g0[i], g1[i]) < 0.5 for i in range(len(images)))


def test_cam_reads_head_weights_from_real_graphs(client):
    """ResNet-20: AveragePool -> Reshape -> Gemm (weights = linear.weight); SqueezeNet: conv10 ->
    GlobalAveragePool -> Softmax (the pooled maps are the scores: CAM = the class's own map)."""
    images = _images()
    cam = client.grad_cam("resnet20", images, method="cam")
    w = client.filters("resnet20", "logits")["weight"].astype(np.float64)  # [10, 64]
    layer = cam.layer
    a = client.activations("resnet20", images, [layer])[layer].astype(np.float64)
    want = np.maximum(np.einsum("nc,nchw->nhw", w[cam.target_index], a), 0)
    np.testing.assert_allclose(cam.cam, want, rtol=1e-4, atol=1e-5)
    sq = client.grad_cam("squeezenet", images, method="cam")
    a = client.activations("squeezenet", images, [sq.layer])[sq.layer]
    np.testing.assert_allclose(sq.cam, np.maximum(a[np.arange(2), sq.target_index], 0), rtol=1e-5, atol=1e-6)
    assert sq.layer == "conv10_2"

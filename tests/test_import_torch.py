"""The weight importer on state_dicts built here with the reference's key names.

The key names and torch shapes below are written from the reference's module
structure (T-SS-GLCNet models/GLCNet.py, deeplab_utils/{ResNet,encoder}.py,
v3p_*_ft.py) and torchvision's ResNet, at 1/8 width so the tests stay cheap.
"""
import io

import numpy as np
import pytest

from glc_jax.tools import import_torch

RNG = np.random.default_rng(0)
W = 0.125  # width multiplier: 64 → 8, 48 → 6, 256 → 32 (all exact)


def c(n):
  return int(n * W)


def _conv(sd, name, out, inp, k, bias=False):
  sd[f"{name}.weight"] = RNG.normal(size=(out, inp, k, k)).astype(np.float32)
  if bias:
    sd[f"{name}.bias"] = RNG.normal(size=(out,)).astype(np.float32)


def _bn(sd, name, ch):
  sd[f"{name}.weight"] = RNG.uniform(0.5, 1.5, ch).astype(np.float32)
  sd[f"{name}.bias"] = RNG.normal(size=ch).astype(np.float32)
  sd[f"{name}.running_mean"] = RNG.normal(size=ch).astype(np.float32)
  sd[f"{name}.running_var"] = RNG.uniform(0.5, 2.0, ch).astype(np.float32)
  sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)


def _linear(sd, name, out, inp):
  sd[f"{name}.weight"] = RNG.normal(size=(out, inp)).astype(np.float32)
  sd[f"{name}.bias"] = RNG.normal(size=(out,)).astype(np.float32)


def resnet50_keys(sd, prefix, bands):
  _conv(sd, f"{prefix}conv1", c(64), bands, 7)
  _bn(sd, f"{prefix}bn1", c(64))
  inplanes = c(64)
  for layer, blocks in enumerate((3, 4, 6, 3), start=1):
    planes = c(64 * 2 ** (layer - 1))
    for i in range(blocks):
      p = f"{prefix}layer{layer}.{i}"
      _conv(sd, f"{p}.conv1", planes, inplanes, 1)
      _bn(sd, f"{p}.bn1", planes)
      _conv(sd, f"{p}.conv2", planes, planes, 3)
      _bn(sd, f"{p}.bn2", planes)
      _conv(sd, f"{p}.conv3", planes * 4, planes, 1)
      _bn(sd, f"{p}.bn3", planes * 4)
      if i == 0:
        _conv(sd, f"{p}.downsample.0", planes * 4, inplanes, 1)
        _bn(sd, f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  return inplanes


def reference_deeplab(bands=4, out_channels=16, encoder="encoder", decoder="decoder",
                      classifier="conv41", conv3="conv3"):
  sd = {}
  high = resnet50_keys(sd, "backbone.", bands)
  for j in range(1, 5):
    _conv(sd, f"{encoder}.ASPP._atrous_convolution{j}.0", c(256), high, 1 if j == 1 else 3)
    _bn(sd, f"{encoder}.ASPP._atrous_convolution{j}.1", c(256))
  _conv(sd, f"{encoder}.ASPP._image_pool.1", c(256), high, 1)
  _bn(sd, f"{encoder}.ASPP._image_pool.2", c(256))
  _conv(sd, f"{encoder}.conv1", c(256), 5 * c(256), 1)
  _bn(sd, f"{encoder}.bn1", c(256))
  _conv(sd, f"{decoder}.conv1", c(48), c(256), 1)
  _bn(sd, f"{decoder}.bn1", c(48))
  _conv(sd, f"{decoder}.conv2", c(256), c(48) + c(256), 3)
  _bn(sd, f"{decoder}.bn2", c(256))
  _conv(sd, f"{decoder}.{conv3}", c(256), c(256), 3)
  _bn(sd, f"{decoder}.{conv3.replace('conv', 'bn')}", c(256))
  _conv(sd, f"{decoder}.{classifier}", out_channels, c(256), 1, bias=True)
  return sd


def reference_glcnet(bands=4, embed=16):
  sd = reference_deeplab(bands, embed)
  _linear(sd, "proj.0", c(256), 2 * c(256))
  _linear(sd, "proj.2", embed, c(256))
  _linear(sd, "proj1.0", embed, embed)
  _linear(sd, "proj1.2", embed, embed)
  return sd


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return np.asarray(tree)


def test_glcnet_state_dict_maps_every_key_with_layouts():
  sd = reference_glcnet()
  variables, report = import_torch.convert_state_dict(sd, "glcnet")
  n_numeric = sum(not k.endswith("num_batches_tracked") for k in sd)
  assert f"{n_numeric} of {n_numeric} leaves set" in report[0]
  checks = {
      "backbone.conv1.weight": ("params/backbone/conv1/kernel", (2, 3, 1, 0)),
      "backbone.layer3.5.conv2.weight": ("params/backbone/layer3_5/conv2/kernel", (2, 3, 1, 0)),
      "backbone.layer2.0.downsample.0.weight":
          ("params/backbone/layer2_0/downsample_conv/kernel", (2, 3, 1, 0)),
      "backbone.layer2.0.downsample.1.weight": ("params/backbone/layer2_0/downsample_bn/scale", None),
      "backbone.layer4.2.bn3.running_var": ("batch_stats/backbone/layer4_2/bn3/var", None),
      "encoder.ASPP._atrous_convolution3.0.weight": ("params/encoder/aspp/conv3/kernel", (2, 3, 1, 0)),
      "encoder.ASPP._image_pool.2.running_mean": ("batch_stats/encoder/aspp/pool_bn/mean", None),
      "encoder.bn1.bias": ("params/encoder/bn1/bias", None),
      "decoder.conv41.weight": ("params/decoder/classifier/kernel", (2, 3, 1, 0)),
      "decoder.conv41.bias": ("params/decoder/classifier/bias", None),
      "proj.0.weight": ("params/global_head/fc1/kernel", (1, 0)),
      "proj1.2.bias": ("params/local_head/fc2/bias", None),
  }
  for key, (path, perm) in checks.items():
    want = sd[key] if perm is None else sd[key].transpose(perm)
    np.testing.assert_array_equal(_leaf(variables, path), want, err_msg=key)


@pytest.mark.parametrize("variant", ["encoder_ft", "resnet_ft", "decoder12_ft"])
def test_finetuned_deeplab_variants(variant):
  kwargs = {"encoder_ft": dict(decoder="decoder_ft", classifier="conv4"),
            "resnet_ft": dict(encoder="encoder_ft", decoder="decoder_ft", classifier="conv4"),
            "decoder12_ft": dict(classifier="conv4", conv3="conv3t")}[variant]
  sd = {f"module.{k}": v for k, v in reference_deeplab(out_channels=6, **kwargs).items()}
  variables, _ = import_torch.convert_state_dict(sd, "deeplab")
  dec = kwargs.get("decoder", "decoder")
  np.testing.assert_array_equal(_leaf(variables, "params/decoder/classifier/kernel"),
                                sd[f"module.{dec}.conv4.weight"].transpose(2, 3, 1, 0))
  conv3 = kwargs.get("conv3", "conv3")
  np.testing.assert_array_equal(_leaf(variables, "batch_stats/decoder/bn3/var"),
                                sd[f"module.{dec}.{conv3.replace('conv', 'bn')}.running_var"])


def test_problems_are_reported_by_name():
  sd = reference_glcnet()
  sd["backbone.layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
  sd["encoder.conv1.weight"] = sd["encoder.conv1.weight"][:, :-1]
  del sd["proj1.2.bias"]
  with pytest.raises(ValueError) as err:
    import_torch.convert_state_dict(sd, "glcnet")
  msg = str(err.value)
  assert "backbone.layer9.0.conv1.weight" in msg
  assert "encoder.conv1.weight: (32, 159, 1, 1)" in msg
  assert "params/local_head/fc2/bias" in msg
  sd = reference_glcnet()
  del sd["proj1.2.bias"]
  variables, report = import_torch.convert_state_dict(sd, "glcnet", allow_missing=True)
  assert "bias" not in variables["params"]["local_head"]["fc2"]
  assert any(line.startswith("missing (1)") for line in report)


def test_torchvision_resnet_first_conv_widened():
  sd = {}
  resnet50_keys(sd, "", 3)
  _linear(sd, "fc", 1000, c(2048))
  rgb = sd["conv1.weight"]
  variables, report = import_torch.convert_state_dict(sd, "torchvision", bands=5)
  assert set(variables["params"]) == {"backbone"}
  kernel = _leaf(variables, "params/backbone/conv1/kernel").transpose(3, 2, 0, 1)  # → (O, I, k, k)
  np.testing.assert_allclose(kernel[:, :3], rgb * 3 / 5, rtol=1e-6)
  np.testing.assert_allclose(kernel[:, 3], rgb.mean(1) * 3 / 5, rtol=1e-6)
  np.testing.assert_allclose(kernel[:, 4], kernel[:, 3])
  # Each filter's sum over bands (its response to a flat input) is unchanged.
  np.testing.assert_allclose(kernel.sum(1), rgb.sum(1), rtol=1e-5, atol=1e-6)
  assert any(line.startswith("ignored (2): backbone.fc.weight") for line in report)


def test_cli_writes_orbax_checkpoint_that_loads_back(tmp_path, capsys):
  sd = reference_glcnet()
  src = tmp_path / "glcnet.npz"
  np.savez(src, **sd)
  out = tmp_path / "imported"
  assert import_torch.main([str(src), str(out), "--kind", "glcnet"]) == 0
  loaded = import_torch.load_imported(str(out))
  np.testing.assert_array_equal(_leaf(loaded, "params/backbone/layer1_0/conv1/kernel"),
                                sd["backbone.layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(_leaf(loaded, "batch_stats/encoder/bn1/mean"),
                                sd["encoder.bn1.running_mean"])
  # Bad input: one line naming the file, then the problems; nothing written.
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"backbone.conv1.weight": sd["backbone.conv1.weight"], "extra.weight": sd["proj.0.weight"]})
  assert import_torch.main([str(bad), str(tmp_path / "nothing")]) == 1
  assert "extra.weight" in capsys.readouterr().err
  assert not (tmp_path / "nothing").exists()


def test_reads_torch_checkpoints(tmp_path):
  torch = pytest.importorskip("torch")
  sd = reference_glcnet()
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, tmp_path / "m.pth")
  read = import_torch.read_state_dict(str(tmp_path / "m.pth"))
  assert set(read) == set(sd)
  np.testing.assert_array_equal(read["proj.0.weight"], sd["proj.0.weight"])


@pytest.mark.parametrize("name", ["nothere.pth", "nothere.npz", "folder.pth"])
def test_missing_or_directory_source_is_one_line_naming_it(tmp_path, capsys, name):
  """A wrong path is reported as such, before (and whether or not) torch is asked for."""
  (tmp_path / "folder.pth").mkdir()
  src = tmp_path / name
  assert import_torch.main([str(src), str(tmp_path / "out")]) == 1
  why = "is a directory, not a checkpoint file" if name == "folder.pth" else "does not exist"
  assert capsys.readouterr().err.splitlines() == [f"{src}: {why}"]
  assert not (tmp_path / "out").exists()


def _truncated_npz() -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, kernel=np.zeros((64, 64), np.float32))
  return buffer.getvalue()[:2000]  # a zip header, no central directory


@pytest.mark.parametrize("content", [b"", b"not an archive\n", _truncated_npz()])
def test_npz_that_is_not_an_archive_is_one_line(tmp_path, capsys, content):
  (tmp_path / "bad.npz").write_bytes(content)
  with pytest.raises(SystemExit, match=r"bad.npz: not an .npz archive of arrays \(numpy.savez\)$"):
    import_torch.main([str(tmp_path / "bad.npz"), str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bands", ["0", "-2", "x"])
def test_a_band_count_below_one_is_refused(tmp_path, capsys, bands):
  (tmp_path / "tv.npz").write_bytes(b"")
  with pytest.raises(SystemExit):
    import_torch.main([str(tmp_path / "tv.npz"), str(tmp_path / "out"), "--kind", "torchvision",
                       f"--bands={bands}"])
  assert f"argument --bands: {bands} is not a band count (1 or more)" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()

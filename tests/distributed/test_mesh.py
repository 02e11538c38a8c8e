import jax
import pytest

from gradax import distributed as gd


def test_mesh_from_spec_has_requested_shape_and_explicit_axes():
  mesh = gd.make_mesh("data=4,model=2")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def test_minus_one_takes_remaining_devices():
  assert dict(gd.make_mesh("data=-1,model=2").shape) == {"data": 4, "model": 2}


@pytest.mark.parametrize("spec, match", [
    ("data=3", "needs 3 devices but 8"),
    ("batch=8", "unknown axis 'batch'"),
    ("data=0", "size 0"),
    ("data", "axis=size"),
    ("data=4,data=2", "given twice"),
    ("data=-1,model=-1", "at most one"),
    ("data=x", "not an integer"),
])
def test_bad_mesh_specs_name_the_problem(spec, match):
  with pytest.raises(ValueError, match=match):
    gd.make_mesh(spec)

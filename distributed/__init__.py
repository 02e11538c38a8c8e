"""gradax.distributed: meshes, sharding rules, compressors and compressed collectives."""

from gradax.distributed.mesh import KNOWN_AXES, make_mesh, parse_mesh_spec

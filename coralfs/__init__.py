"""coralfs: git for model checkpoints, shaped as a filesystem.

Layers (imports only point down this list):
hashing/records/tensorcodec -> store -> formats/objects -> repository -> cli, fuse
"""

from coralfs.errors import CoralError

__version__ = "0.1.0"

__all__ = ["CoralError", "Repository", "__version__"]


def __getattr__(name: str):  # lazy, so `import coralfs` stays cheap
    if name == "Repository":
        from coralfs.repository import Repository

        return Repository
    raise AttributeError(name)

"""coralfs: git for model checkpoints, shaped as a filesystem.

The layers (imports only point down) are stated in tests/test_architecture.py; what each
package owns is in docs/design.md.
"""

from coralfs.errors import CoralError

__version__ = "0.1.0"

__all__ = ["CoralError", "Repository", "__version__"]


def __getattr__(name: str):  # lazy, so `import coralfs` stays cheap
    if name == "Repository":
        from coralfs.repository import Repository

        return Repository
    raise AttributeError(name)

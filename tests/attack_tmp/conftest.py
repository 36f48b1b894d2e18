import pytest

@pytest.fixture
def kernel(engine, base_image, tmp_path):
    from tests.conftest import give_to_cell
    from tests.kernel import Kernel, isolated_env
    ws = tmp_path / "notebook-dir"
    ws.mkdir()
    give_to_cell(ws)
    k = Kernel(cwd=str(ws), env=isolated_env(tmp_path / "mino-home"))
    k.ok("%load_ext mino_jupyter")
    yield k
    k.shutdown()

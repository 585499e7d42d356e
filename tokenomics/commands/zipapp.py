"""`make pyz`: the whole product as one runnable file, `dist/tokenomics.pyz`."""

import os


def build_zipapp(target: str = "dist/tokenomics.pyz") -> str:
    """Build one runnable archive: this package plus the pure-Python h11 and PyYAML, with a
    __main__ that keeps the exit code. Timestamps are fixed so the archive is reproducible."""
    import shutil
    import tempfile
    import zipapp
    import zipfile

    import h11
    import yaml
    build = tempfile.mkdtemp(prefix="tokenomics-pyz-")
    try:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        shutil.copytree(package, os.path.join(build, "tokenomics"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for package in (h11, yaml):
            source = os.path.dirname(package.__file__)
            shutil.copytree(source, os.path.join(build, package.__name__),
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.dist-info"))
        with open(os.path.join(build, "__main__.py"), "w", encoding="utf-8") as fh:
            fh.write("import sys\nfrom tokenomics.cli import main\nsys.exit(main())\n")
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        raw = target + ".tmp"
        zipapp.create_archive(build, raw, interpreter="/usr/bin/env python3")
        with open(raw, "rb") as fh:  # rewrite with fixed timestamps and sorted entries
            shebang = fh.readline()
        with zipfile.ZipFile(raw) as src, open(target, "wb") as out:
            out.write(shebang)
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
                for name in sorted(src.namelist()):
                    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    dst.writestr(info, src.read(name))
        os.unlink(raw)
        os.chmod(target, 0o755)
        return target
    finally:
        shutil.rmtree(build, ignore_errors=True)


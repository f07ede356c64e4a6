"""Guest images: Debian's kernel and a busybox initramfs, built once and cached.

The kernel is whatever Debian's `linux-image-amd64` metapackage names today,
fetched with apt. Its bzImage is decompressed on the host into the ELF
vmlinux and that is booted directly through its PVH entry (ELF note 18),
which skips the real-mode decompressor: much faster under TCG. Where the
note is missing the bzImage is booted instead, and the manifest says so.

Output lives in a content-addressed directory under the XDG cache: the key
covers the kernel package version, the recipe, the init template and the
busybox binary, so a change to any of them gives a new image and nothing
else does."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import ImageError
from harness.paths import cache_dir
from harness.progress import Progress, silent

RECIPE_DIR = Path(__file__).resolve().parent.parent / "images"
BUILDER_VERSION = 3  # bump when this module changes what it writes
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass
class Image:
    kernel: str            # the bzImage
    vmlinux: str | None    # the ELF to boot through PVH, when it has the note
    initramfs: str
    kernel_version: str    # e.g. 6.1.0-56-amd64
    kernel_package: str    # e.g. linux-image-6.1.0-56-amd64=6.1.192-2
    modules: list[str]
    key: str
    built: float

    @property
    def boot_kernel(self) -> str:
        return self.vmlinux or self.kernel

    @property
    def dir(self) -> Path:
        return Path(self.initramfs).parent


def images_dir() -> Path:
    return cache_dir() / "images"


def _recipe() -> tuple[dict, str, str]:
    try:
        recipe_text = (RECIPE_DIR / "recipe.toml").read_text()
        init_text = (RECIPE_DIR / "init.sh").read_text()
    except OSError as exc:
        raise ImageError(f"image recipe missing: {exc.filename}: {exc.strerror}") from exc
    return tomllib.loads(recipe_text), recipe_text, init_text


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {cmd[0]} not found; run scripts/setup.sh "
                         "(it installs the Debian packages the images need)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: `{' '.join(cmd)}` took more than {timeout:g} s") from exc
    if p.returncode:
        raise ImageError(f"{what}: `{' '.join(cmd)}` failed: {p.stderr.strip()[-800:]}")
    return p.stdout


APT_LISTS = Path("/var/lib/apt/lists")


def resolve_kernel(metapackage: str) -> tuple[str, str]:
    """The versioned kernel package the metapackage depends on, and its version.

    Asking apt costs ~1.2 s here, so the answer is remembered until apt's
    package lists change (`apt-get update` rewrites that directory)."""
    memo = cache_dir() / "kernel-resolution.json"
    try:
        lists = APT_LISTS.stat().st_mtime_ns
    except OSError:
        lists = 0
    try:
        m = json.loads(memo.read_text())
        if m["metapackage"] == metapackage and m["lists"] == lists and lists:
            return m["package"], m["version"]
    except (OSError, ValueError, KeyError):
        pass
    pkg, version = _ask_apt(metapackage)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"metapackage": metapackage, "lists": APT_LISTS.stat().st_mtime_ns,
                                "package": pkg, "version": version}))
    return pkg, version


def _ask_apt(metapackage: str) -> tuple[str, str]:
    def lookup() -> tuple[str, str] | None:
        out = subprocess.run(["apt-cache", "depends", metapackage], capture_output=True,
                             text=True, timeout=60).stdout
        deps = [ln.split(":", 1)[1].strip() for ln in out.splitlines()
                if ln.strip().startswith("Depends:") and "linux-image-" in ln]
        if not deps:
            return None
        pol = subprocess.run(["apt-cache", "policy", deps[0]], capture_output=True, text=True,
                             timeout=60).stdout
        cand = [ln.split(":", 1)[1].strip() for ln in pol.splitlines()
                if ln.strip().startswith("Candidate:")]
        return (deps[0], cand[0]) if cand and cand[0] != "(none)" else None

    if shutil.which("apt-cache") is None:
        raise ImageError("apt-cache not found: the image builder needs Debian's apt")
    found = lookup()
    if found is None and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"], "refreshing the package lists")
        found = lookup()
    if found is None:
        raise ImageError(f"apt does not know {metapackage!r}; run `apt-get update` "
                         "(as root) and try again")
    return found


def bzimage_to_vmlinux(bzimage: bytes) -> bytes:
    """Decompresses the payload of an x86 bzImage: the kernel's ELF image."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("not an x86 bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    off, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + off
    payload = bzimage[start:start + length]
    if len(payload) != length:
        raise ImageError("bzImage payload is truncated")
    if payload.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor().decompress(payload)  # trailing size word ignored
    elif payload.startswith(b"\x1f\x8b"):
        out = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        out = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True,
                             check=True).stdout
    else:
        raise ImageError(f"bzImage payload compressed in an unknown way ({payload[:4].hex()})")
    if not out.startswith(b"\x7fELF"):
        raise ImageError("bzImage payload did not decompress to an ELF image")
    return out


def has_pvh_note(path: Path) -> bool:
    """Does the ELF carry XEN_ELFNOTE_PHYS32_ENTRY, the PVH entry point?"""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            for seg in ELFFile(f).iter_segments():
                if seg.header.p_type != "PT_NOTE":
                    continue
                for note in seg.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        return True
    except ELFError as exc:
        raise ImageError(f"{path}: not a readable ELF file: {exc}") from exc
    return False


def module_load_order(modroot: Path, wanted: list[str]) -> list[str]:
    """Module paths (relative to modroot) in an order that loads each after its
    dependencies, from modules.dep."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modroot / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in reversed(deps.get(mod, [])):  # modules.dep lists the deepest last
            visit(d)
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ImageError(f"kernel module {name!r} is not in this kernel's modules.dep")
        visit(by_name[key])
    return order


class _Cpio:
    """A newc cpio archive, written without root (device nodes included)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
               ) -> None:
        nm = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0]
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nm)
        self.buf.write(b"\0" * (-(110 + len(nm)) % 4) + data + b"\0" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(data: bytes) -> bytes:
    """Drops a module's appended signature. Checking it (SHA-256 over the
    module, then RSA) is slow under TCG; the kernel does not require it
    (MODULE_SIG_FORCE is off) and only notes an unsigned module once."""
    if not data.endswith(SIG_MAGIC) or len(data) < len(SIG_MAGIC) + 12:
        return data
    info = data[-len(SIG_MAGIC) - 12:-len(SIG_MAGIC)]
    signer_len, key_id_len = info[3], info[4]
    (sig_len,) = struct.unpack(">I", info[8:12])
    cut = len(SIG_MAGIC) + 12 + sig_len + signer_len + key_id_len
    if cut > len(data):
        raise ImageError("module signature trailer is larger than the module")
    return data[:-cut]


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    elif path.suffix == ".zst":
        data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                              check=True).stdout
    return strip_signature(data)


FRESH_SOURCE = Path(__file__).resolve().parents[1] / "native" / "fresh" / "dh_fresh.c"


def compile_fresh(out: Path) -> Path:
    """dh-fresh, static: the initramfs has no libc. It is part of the image
    (its source is in the image's key), not of the Python package."""
    exe = out / "dh-fresh"
    _run(["gcc", "-static", "-O2", "-Wall", "-o", str(exe), str(FRESH_SOURCE)],
         "compiling dh-fresh (gcc and libc6-dev: scripts/setup.sh installs them)")
    return exe


def build_initramfs(busybox: Path, init_text: str, modroot: Path,
                    lists: dict[str, list[str]], fresh: Path) -> bytes:
    """lists: file name under /etc -> module paths in load order."""
    c = _Cpio()
    for d in ("bin", "dev", "etc", "proc", "sys", "newroot", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("bin/dh-fresh", fresh.read_bytes(), 0o755)
    c.file("init", init_text.encode(), 0o755)
    for listname, order in lists.items():
        names = []
        for mod in order:
            name = Path(mod).name.split(".ko")[0] + ".ko"
            c.file(f"lib/modules/{name}", _read_module(modroot / mod))
            names.append(name)
        c.file(f"etc/{listname}", ("\n".join(names) + "\n").encode())
    return c.finish()


def _key(package: str, recipe_text: str, init_text: str, busybox: Path) -> str:
    h = hashlib.sha256()
    for part in (str(BUILDER_VERSION), package, recipe_text, init_text):
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(busybox.read_bytes()).digest())
    h.update(hashlib.sha256(FRESH_SOURCE.read_bytes()).digest())
    return h.hexdigest()[:16]


def _load(d: Path) -> Image | None:
    try:
        img = Image(**json.loads((d / "manifest.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    files = [img.kernel, img.initramfs] + ([img.vmlinux] if img.vmlinux else [])
    return img if all(Path(f).is_file() for f in files) else None


def build(progress: Progress | None = None, force: bool = False) -> Image:
    """The current image, built if any input changed since the last build."""
    say = progress or silent
    recipe, recipe_text, init_text = _recipe()
    busybox = Path(recipe.get("busybox", "/bin/busybox"))
    if not busybox.is_file():
        raise ImageError(f"{busybox} not found: `apt-get install busybox-static` "
                         "(scripts/setup.sh does this)")
    say(f"resolving {recipe['kernel_package']}")
    pkg, version = resolve_kernel(recipe["kernel_package"])
    key = _key(f"{pkg}={version}", recipe_text, init_text, busybox)
    out = images_dir() / key
    if not force and (img := _load(out)) is not None:
        say(f"image {key} is up to date ({pkg} {version})")
        return img
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = next(debs.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"), None)
    if deb is None:
        say(f"downloading {pkg} {version} with apt")
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"],
             f"downloading {pkg}", cwd=debs)
        deb = next(debs.glob(f"{pkg}_*.deb"), None)
        if deb is None:
            raise ImageError(f"apt-get download {pkg} left no .deb in {debs}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dh-image-") as tmp:
        root = Path(tmp)
        say(f"extracting {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"extracting {deb.name}")
        vmlinuz = next((root / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise ImageError(f"{deb.name} has no /boot/vmlinuz-*")
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        modroot = root / "lib/modules" / kver
        if not modroot.is_dir():
            raise ImageError(f"{deb.name} has no /lib/modules/{kver}")
        _run(["depmod", "-b", str(root), kver], "depmod (writes modules.dep)")
        base = module_load_order(modroot, recipe["modules"])
        disk = [m for m in module_load_order(modroot, recipe.get("disk_modules", []))
                if m not in base]
        rootimg = [m for m in module_load_order(modroot, recipe.get("root_modules", []))
                   if m not in base]
        lazy = [m for m in module_load_order(modroot, recipe.get("lazy_modules", []))
                if m not in base + disk + rootimg]
        order = base + disk + [m for m in rootimg if m not in disk] + lazy
        images_dir().mkdir(parents=True, exist_ok=True)
        tmp_out = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=images_dir()))
        tmp_out.chmod(0o755)
        try:
            shutil.copyfile(vmlinuz, tmp_out / "vmlinuz")
            say("decompressing the bzImage into vmlinux")
            (tmp_out / "vmlinux").write_bytes(bzimage_to_vmlinux((tmp_out / "vmlinuz")
                                                                 .read_bytes()))
            pvh = has_pvh_note(tmp_out / "vmlinux")
            if not pvh:
                say("vmlinux has no PVH entry note: booting the bzImage instead (slower)")
                (tmp_out / "vmlinux").unlink()
            say(f"writing the initramfs ({len(order)} modules)")
            (tmp_out / "initramfs.cpio").write_bytes(build_initramfs(
                busybox, init_text, modroot, {"modules.load": base, "modules.disk": disk,
                                              "modules.root": rootimg, "modules.lazy": lazy},
                compile_fresh(root)))
            img = Image(kernel=str(out / "vmlinuz"), vmlinux=str(out / "vmlinux") if pvh else None,
                        initramfs=str(out / "initramfs.cpio"), kernel_version=kver,
                        kernel_package=f"{pkg}={version}",
                        modules=[Path(m).name for m in order], key=key, built=time.time())
            (tmp_out / "manifest.json").write_text(json.dumps(asdict(img), indent=1))
            shutil.rmtree(out, ignore_errors=True)
            tmp_out.rename(out)  # atomic: a reader sees a whole image or none
        except BaseException:
            shutil.rmtree(tmp_out, ignore_errors=True)
            raise
    say(f"image {key} built in {time.monotonic() - t0:.1f} s")
    return img


def list_images() -> list[Image]:
    d = images_dir()
    found = [_load(p) for p in sorted(d.iterdir())] if d.is_dir() else []
    return sorted((i for i in found if i is not None), key=lambda i: i.built)


def clean() -> int:
    """Removes every cached image and downloaded package; returns bytes freed."""
    total = 0
    for d in (images_dir(), cache_dir() / "debs"):
        if d.is_dir():
            total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d)
    return total

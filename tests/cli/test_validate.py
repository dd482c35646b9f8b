"""validate reports every problem in every file, and config files it would not load for their name."""

from __future__ import annotations


def test_every_error_in_every_file(sbx, cfg):
    bad_ext = cfg.write("ext.broken.yaml", "id: ext.broken\n")
    bad_yaml = cfg.write("profile.bad.yaml", "slug: [unclosed\n")
    two = cfg.write("profile.two.yaml", "slug: two\nextension: ext.local\nttl: {default: 1x}\nfrobnicate: 1\n")
    p = sbx("validate", check=78)
    errors = p.stderr.splitlines()
    assert all(line.startswith("error: ") for line in errors)
    assert any(line.startswith(f"error: {bad_ext}: field 'title'") for line in errors)
    assert any(line.startswith(f"error: {bad_ext}: field 'version'") for line in errors)
    assert f"error: {bad_yaml}: invalid YAML (line 2, column 1): expected ',' or ']', but got '<stream end>'" in errors
    assert any(line.startswith(f"error: {two}: field 'ttl.default'") for line in errors)
    assert f"error: {two}: field 'frobnicate' (value 1): unknown field" in errors
    assert p.stdout == f"invalid: {len(errors)} problems in 3 files\n"


def test_misnamed_config_files_are_reported(sbx, cfg):
    good = "slug: {}\nextension: ext.local\n"
    (cfg.root / "profiles" / "profile.x.yml").write_text(good.format("x"))
    (cfg.root / "extensions" / "ext.y.yml").write_text("id: ext.y\n")
    (cfg.root / "profile-z.yaml").write_text(good.format("z"))
    (cfg.root / "profiles" / "build.yaml").write_text(good.format("build"))
    (cfg.root / "settings.yaml").write_text("budgets: {}\n")  # these are not config-looking mistakes
    (cfg.root / "notes.txt").write_text("hello\n")
    p = sbx("validate", check=78)
    assert p.stderr.splitlines() == [
        f"error: {cfg.root}/profile-z.yaml: not loaded: profile files are named profile.<slug>.yaml; "
        "rename it (to profile.z.yaml?)",
        f"error: {cfg.root}/extensions/ext.y.yml: not loaded: extension manifest files are named ext.<name>.yaml; "
        "rename it (to ext.y.yaml?)",
        f"error: {cfg.root}/profiles/build.yaml: not loaded: profile files are named profile.<slug>.yaml; "
        "rename it (to profile.build.yaml?)",
        f"error: {cfg.root}/profiles/profile.x.yml: not loaded: profile files are named profile.<slug>.yaml; "
        "rename it (to profile.x.yaml?)",
    ]


def test_a_valid_config_is_ok(sbx, cfg):
    cfg.write("profile.fine.yaml", "slug: fine\nextension: ext.local\n")
    p = sbx("validate", check=0)
    assert p.stdout.startswith("ok: ") and p.stderr == ""

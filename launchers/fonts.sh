# Sourced by smoke_test.sh and replicate.sh: install_fonts installs the Debian font packages the demo data and the
# replication split into training and held-out collections (data_tools/fonts.py FONT_PACKAGES) that are missing,
# when running as root with apt-get (FONTS_NO_APT=1 skips it); otherwise it says which ones are missing.
install_fonts() {
    local pkgs missing
    pkgs=$(python -c "from data_tools.fonts import FONT_PACKAGES; print(' '.join(FONT_PACKAGES))")
    missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | tr '\n' ' ')
    [ -z "${missing// /}" ] && return 0
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && [ -z "${FONTS_NO_APT:-}" ]; then
        echo "== installing font packages: $missing"
        # shellcheck disable=SC2086
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
            || echo "   apt-get failed; training and held-out use the fonts this machine has"
    else
        echo "== font packages not installed (fewer training fonts, or no held-out collection): $missing"
    fi
}

# What debian-minimal would have set: the layer was built with it.
export DISTRO_NAME=debian
export DIB_RELEASE=${DIB_RELEASE:-trixie}
export DIB_INIT_SYSTEM=systemd
export EFI_BOOT_DIR="EFI/debian"
# Everything is installed already: no upgrade pass, no grub package install.
export DIB_AVOID_PACKAGES_UPDATE=1
export DIB_SKIP_GRUB_PACKAGE_INSTALL=True

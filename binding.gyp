{
  # fdferry's native addon: build/Release/fdferry.node. Linux only (memfd, SO_PEERCRED, SCM_RIGHTS details).
  # Build offline against the installed headers: `node-gyp rebuild --nodedir=/usr` (or npm config nodedir=/usr).
  "targets": [
    {
      "target_name": "fdferry",
      "conditions": [
        ["OS=='linux'", {
          "sources": [
            "native/binding.cc",
            "native/constants.cc",
            "native/errors.cc",
            "native/fd.cc",
            "native/fish_pump.cc",
            "native/memfd.cc",
            "native/netlink.cc",
            "native/netns.cc",
            "native/notify.cc",
            "native/onramp.cc",
            "native/seqpacket.cc",
            "native/splice_engine.cc",
            "native/tcp_info.cc",
            "native/tun.cc",
            "native/upgrade_pump.cc",
          ],
        }],
        ["OS!='linux'", {
          # Fail at configure time rather than with a pile of missing-header errors.
          "sources": ["<!(node -e \"console.error('fdferry: the native addon is Linux-only'); process.exit(1)\")"],
        }],
      ],
      # The _except target turns C++ exceptions on (NAPI_CPP_EXCEPTIONS, no -fno-exceptions), so Napi::Error
      # propagates as an exception and is converted to a JS throw at every N-API entry point.
      "dependencies": [
        "<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except",
      ],
      "defines": [
        # Node 20's headers default to NAPI_VERSION 8 when it is unset: pin the level Node 20 provides (9) explicitly.
        "NAPI_VERSION=9",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
      ],
      # Node's common.gypi adds -std=gnu++17 (and -O3 in Release); we want exactly the flags below.
      "cflags!": ["-O3"],
      "cflags_cc!": ["-std=gnu++17", "-O3"],
      "cflags_cc": [
        "-std=c++20",
        "-O2",
        "-Wall",
        "-Wextra",
        "-fstack-protector-strong",
        "-D_FORTIFY_SOURCE=2",
        "-fPIC",
      ],
      "ldflags": ["-Wl,-z,relro,-z,now,-z,noexecstack"],
      "configurations": {
        "Release": {
          "cflags!": ["-O3"],
          "cflags_cc!": ["-O3"],
        },
      },
    },
  ],
}

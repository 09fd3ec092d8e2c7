{
  "targets": [
    {
      "target_name": "blockgate_native",
      "sources": ["native-bindings/blockgate_native.c", "native-bindings/lz4_block.c", "native-bindings/xxh3_128.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Werror"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"]
    }
  ]
}

#!/usr/bin/env bash
# Regenerates protos/precond_service_pb2.py and protos/precond_service_pb2_grpc.py
# from protos/precond_service.proto; run it after editing the .proto and commit the
# result. Usage: PYTHON=/path/to/python protos/generate.sh
#
# Use grpcio-tools 1.62.x (pip install "grpcio-tools==1.62.3" into a scratch
# virtualenv): its protoc writes code without the protobuf runtime-version check
# and without the grpcio version check that later releases add, so the committed
# code imports with every protobuf runtime from 4.25 to 7.x and grpcio >= 1.62.
# Newer grpcio-tools work too but pin the runtime to at least their own versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
version="$("$PYTHON" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))')"
case "$version" in
  1.62.*) ;;
  *) echo "warning: grpcio-tools $version; the generated code will need protobuf and grpcio" \
          "at least as new as it (1.62.x keeps the wide range)" >&2 ;;
esac
# The include path is the repository root, so the generated gRPC module imports
# its messages as `from protos import precond_service_pb2`.
"$PYTHON" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/precond_service.proto
echo "generated protos/precond_service_pb2.py and protos/precond_service_pb2_grpc.py with grpcio-tools $version"

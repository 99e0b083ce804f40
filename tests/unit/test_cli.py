"""The command line reaches the components: flags are not only parsed but applied."""

from signalbox.cli import build_parser, local_gateway, pod_options


def test_no_accounting_turns_accounting_off_in_envoy_and_in_every_ext_proc_worker(tmp_path):
    args = build_parser().parse_args(["up", "-f", "x.yaml", "--workdir", str(tmp_path), "--no-accounting"])
    gateway = local_gateway(args)
    assert gateway.options.accounting is False  # no usage filter, no access log in Envoy's listener
    assert all("--no-accounting" in gateway.extproc_argv(n) for n in range(len(gateway.options.extproc_sockets)))
    # The ext_proc parses what the gateway passes it.
    assert build_parser().parse_args(gateway.extproc_argv(0)[3:]).no_accounting is True

    on = local_gateway(build_parser().parse_args(["up", "-f", "x.yaml", "--workdir", str(tmp_path)]))
    assert on.options.accounting is True and "--no-accounting" not in on.extproc_argv(0)


def test_the_gateway_pods_processes_honour_no_accounting():
    for command in ("config-sync", "gateway-sidecar"):
        assert pod_options(build_parser().parse_args([command, "--no-accounting"])).accounting is False
        assert pod_options(build_parser().parse_args([command])).accounting is True


def test_the_request_log_is_on_by_default_and_goes_to_the_workdir_locally_and_stdout_in_a_pod(tmp_path):
    up = ["up", "-f", "x.yaml", "--workdir", str(tmp_path)]
    assert local_gateway(build_parser().parse_args(up)).options.request_log == str(tmp_path / "requests.log")
    assert local_gateway(build_parser().parse_args([*up, "--no-request-log"])).options.request_log == ""
    for command in ("config-sync", "gateway-sidecar"):
        assert pod_options(build_parser().parse_args([command])).request_log == "/dev/stdout"
        assert pod_options(build_parser().parse_args([command, "--no-request-log"])).request_log == ""

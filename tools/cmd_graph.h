#ifndef VKG_CMD_GRAPH_H
#define VKG_CMD_GRAPH_H
/* Each takes the arguments after its subcommand and returns the process exit code. */
int vkg_cmd_inspect(int argc, char **argv);
int vkg_cmd_run(int argc, char **argv);
int vkg_cmd_bench_graph(int argc, char **argv);
#endif

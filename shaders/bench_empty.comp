#version 450
// Does nothing: measures the fixed cost of a dispatch and of a submit.
layout(local_size_x = 1) in;
layout(std430, binding = 0) buffer Y { float y[]; };
void main() {}

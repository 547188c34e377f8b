# vkg_add_shader(<out-list> NAME <blob> SOURCE <file.comp> [DEFINES A=1 B ...])
# Compiles one GLSL compute shader to SPIR-V, validates it with spirv-val and turns it into a C header
# holding a uint32_t array, so the library carries its kernels and never reads them from disk.
function(vkg_add_shader out_list)
  cmake_parse_arguments(S "" "NAME;SOURCE" "DEFINES" ${ARGN})
  set(spv ${CMAKE_CURRENT_BINARY_DIR}/${S_NAME}.spv)
  set(hdr ${CMAKE_CURRENT_BINARY_DIR}/${S_NAME}.spv.h)
  set(defs "")
  # Any change to a shared include rebuilds every blob: a handful of small shaders.
  file(GLOB includes ${CMAKE_CURRENT_SOURCE_DIR}/*.glsl)
  foreach(d ${S_DEFINES})
    list(APPEND defs "-D${d}")
  endforeach()
  add_custom_command(
    OUTPUT ${hdr}
    COMMAND ${GLSLANG} --quiet -V --target-env vulkan1.1 ${defs} -I${CMAKE_CURRENT_SOURCE_DIR}
            -o ${spv} ${CMAKE_CURRENT_SOURCE_DIR}/${S_SOURCE}
    COMMAND ${SPIRV_VAL} --target-env vulkan1.1 ${spv}
    COMMAND ${GLSLANG} --quiet -V --target-env vulkan1.1 ${defs} -I${CMAKE_CURRENT_SOURCE_DIR}
            --vn vkg_spv_${S_NAME} -o ${hdr} ${CMAKE_CURRENT_SOURCE_DIR}/${S_SOURCE}
    DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${S_SOURCE} ${includes}
    COMMENT "GLSL -> SPIR-V (validated): ${S_NAME}"
    VERBATIM)
  set(${out_list} ${${out_list}} ${hdr} PARENT_SCOPE)
endfunction()

# Installation (cmake --install BUILD [--prefix DIR]), laid out by GNUInstallDirs:
#   lib/libvkg.so.X (+ links), lib/libvkg.a   the shared (vkg.h exported only) and static library;
#                                             both carry the SPIR-V of every kernel (vkg_shaders)
#   include/vkg.h, include/vkg_version.h
#   bin/vkg                                   the command line (tools/CMakeLists.txt)
#   lib/cmake/vkg/                            find_package(vkg): vkg::vkg (shared), vkg::vkg_static
#   lib/pkgconfig/vkg.pc                      pkg-config --cflags --libs vkg (relocatable)
# samples/embed builds against this tree, as an application would (scripts/test.sh).
include(CMakePackageConfigHelpers)

set(VKG_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/vkg)

install(TARGETS vkg vkg_shared EXPORT vkgTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(FILES ${PROJECT_SOURCE_DIR}/include/vkg.h ${PROJECT_BINARY_DIR}/include/vkg_version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(EXPORT vkgTargets NAMESPACE vkg:: FILE vkgTargets.cmake DESTINATION ${VKG_INSTALL_CMAKEDIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/vkgConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/vkgConfig.cmake INSTALL_DESTINATION ${VKG_INSTALL_CMAKEDIR})
# Same rule as the SONAME: within 0.x only the same minor version is compatible.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(compat SameMinorVersion)
else()
  set(compat SameMajorVersion)
endif()
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/vkgConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY ${compat})
install(FILES ${PROJECT_BINARY_DIR}/cmake/vkgConfig.cmake ${PROJECT_BINARY_DIR}/cmake/vkgConfigVersion.cmake
  DESTINATION ${VKG_INSTALL_CMAKEDIR})

# pkg-config: prefix relative to the .pc file itself, so `cmake --install --prefix` anywhere works.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(VKG_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(VKG_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  set(VKG_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  file(RELATIVE_PATH rel "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
  string(REGEX REPLACE "/$" "" rel "${rel}")
  set(VKG_PC_PREFIX "\${pcfiledir}/${rel}")
  set(VKG_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(VKG_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/vkg.pc.in ${PROJECT_BINARY_DIR}/cmake/vkg.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/cmake/vkg.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

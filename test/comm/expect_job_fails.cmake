# Runs a job that must fail: cmake -DJOB="<command;args…>" -DEXPECT="<regex>" -P expect_job_fails.cmake
# Passes when the job ends with a non-zero exit status and its output (stdout and stderr
# together) matches EXPECT. A job that hangs is ended by the CTest TIMEOUT of the test that runs
# this script.
if(NOT JOB OR NOT EXPECT)
  message(FATAL_ERROR "expect_job_fails.cmake needs -DJOB=… and -DEXPECT=…")
endif()
execute_process(COMMAND ${JOB} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the job exited with status 0, but a rank failed: it must not succeed")
endif()
if(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "the job failed (status ${rc}) but its output does not match: ${EXPECT}")
endif()
message("the job failed as expected (status ${rc})")

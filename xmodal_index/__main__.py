from xmodal_index.jobs.cli import main

if __name__ == "__main__":
    main()
